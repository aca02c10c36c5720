"""The low-rank structure ``rankk:R``: a seeded randomized range finder, the frame carrying the
rank-R factors P and Q of C(x) = P Q^T (or the dense tensor when low rank would not be smaller)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FrameError
from .base import _U32, HEADER_SIZE, Compressor, _as_shape, _flat_f32, _mv, _numel
from .seeds import _subseed


def _qr(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal factor of a reduced QR.  On CPU via numpy's LAPACK, which for the thin matrices
    used here is ~100x faster than torch.linalg.qr under thread contention."""
    if isinstance(a, np.ndarray):
        return np.linalg.qr(a, mode="reduced")[0].astype(np.float32, copy=False)
    return torch.linalg.qr(a).Q


class RankK(Compressor):
    """Rank-r approximation C(x) = P Q^T of x viewed as m x n (m = shape[0], n = numel/m); for a
    stacked parameter (`per_expert(E)`: shape (E, m, ...)) rank r per expert, P (E, m, r), Q (E, n, r).

    Randomized range finder seeded by ``seed``: Gaussian sketch of the smaller side, 2 power
    iterations, orthonormal basis by QR (kept only if it captures at least the energy of the plain
    sketch, else the plain sketch's basis).  The other factor is the least-squares fit, so C is the
    orthogonal projection of x onto an r-dimensional row/column space: ||C(x)-x||^2 = ||x||^2 -
    ||C(x)||^2 <= ||x||^2 always, and E||C(x)-x||^2 <= (1 - r/min(m,n))||x||^2 over the seed.
    With bf16/fp16 the orthonormal factor is rounded first and the other factor is refitted to the
    rounded basis (still a projection), then rounded: alpha = (r/min(m,n)) * alpha_codec.
    Only fp32/bf16/fp16 value codecs are allowed (others would destroy the projection).

    Frame: header (18) + u32 r + codec(m*r entries of P, row-major) + codec(n*r entries of Q).
    Length = 22 + size_codec(m*r) + size_codec(n*r).
    Fallback: for tensors with fewer than 2 dims, or when r' = min(r, m, n) has r'(m+n) >= m*n,
    the frame has r = 0 and carries the dense tensor: length = 22 + size_codec(numel), alpha =
    alpha_codec.
    """

    sid, struct_name = 3, "rankk"
    FIXED = HEADER_SIZE + 4
    POWER_ITERS = 2

    def __init__(self, codec, spec, r):
        super().__init__(codec, spec)
        self.r = r
        self.experts = 1  # > 1: a stacked parameter, rank r per expert (`per_expert`)

    def _geom(self, shape):
        """(numel, m, n, r) of one matrix (one expert's when stacked); r = 0: the dense fallback."""
        shape = _as_shape(shape)
        d = _numel(shape)
        e = self.experts
        if len(shape) < (3 if e > 1 else 2) or d == 0 or (e > 1 and shape[0] != e):
            return d, 0, 0, 0
        m = shape[1] if e > 1 else shape[0]
        n = d // (e * m)
        r = min(self.r, m, n)
        if r * (m + n) >= m * n:
            return d, m, n, 0
        return d, m, n, r

    def rank(self, shape) -> int:
        """Rank used for this shape (0 = dense fallback)."""
        return self._geom(shape)[3]

    def alpha(self, shape):
        d, m, n, r = self._geom(shape)
        if r == 0:
            return self.codec.alpha(d)
        return (r / min(m, n)) * self.codec.alpha(max(m, n) * r)

    def frame_size(self, shape, nnz_layout=None):
        d, m, n, r = self._geom(shape)
        if r == 0:
            return self.FIXED + self.codec.size(d)
        e = self.experts
        return self.FIXED + self.codec.size(e * m * r) + self.codec.size(e * n * r)

    def per_expert(self, experts: int) -> "RankK":
        """This compressor for a stacked (E, rows, cols...) parameter: rank r per expert matrix (both
        ends build it from the layer spec, so the frame need not say so)."""
        c = RankK(self.codec, self.spec, self.r)
        c.experts = int(experts)
        return c

    def encode(self, x, seed=0):
        v = _flat_f32(x)
        d, m, n, r = self._geom(x.shape)
        if r == 0:
            parts = [self._header(d), _U32.pack(0)] + self.codec.encode(v, _subseed(seed, 4))
            return b"".join(parts)
        if self.experts == 1:
            Pf, Qf = self._factors(v.reshape(m, n), r, seed)
        else:  # one range finder per expert (seeded apart), the factors stacked expert by expert
            X = v.reshape(self.experts, m, n)
            fs = [self._factors(X[e], r, _subseed(seed, 64 + e)) for e in range(self.experts)]
            Pf, Qf = torch.stack([f[0] for f in fs]), torch.stack([f[1] for f in fs])
        parts = [self._header(d), _U32.pack(r)]
        parts += self.codec.encode(Pf.contiguous().reshape(-1), _subseed(seed, 6))
        parts += self.codec.encode(Qf.contiguous().reshape(-1), _subseed(seed, 7))
        return b"".join(parts)

    def _factors(self, X, r, seed):
        """(P, Q) with C(X) = P Q^T for one m x n matrix X (fp32 tensors)."""
        m, n = X.shape
        cpu = X.device.type == "cpu"
        # CPU: numpy/LAPACK (torch's threaded kernels stall on thin matrices under CPU contention)
        Xa = X.numpy() if cpu else X
        A = Xa.T if m <= n else Xa  # a x b with b = min(m, n) the sketched side
        b = A.shape[1]
        g = torch.Generator().manual_seed(_subseed(seed, 5) & 0x7FFFFFFFFFFFFFFF)
        G = torch.randn(b, r, generator=g)
        G = G.numpy() if cpu else G.to(X.device)
        Om = _qr(G)
        Y0 = A @ Om
        floor = float((Y0 * Y0).sum())
        P0 = _qr(Y0)
        P = P0
        for _ in range(self.POWER_ITERS):
            Z = _qr(A.T @ P)
            P = _qr(A @ Z)
        B = A.T @ P
        if float((B * B).sum()) < floor:
            P = P0
            B = A.T @ P
        if self.codec.cid != 0:
            Pt = torch.from_numpy(np.ascontiguousarray(P)) if cpu else P
            Pq = self._roundtrip(Pt.reshape(-1)).reshape(P.shape)
            Pq = Pq if cpu else torch.from_numpy(Pq).to(X.device)
            gram = Pq.T @ Pq
            rhs = (A.T @ Pq).T
            try:
                B = (np.linalg.solve(gram, rhs) if cpu else torch.linalg.solve(gram, rhs)).T
            except (RuntimeError, np.linalg.LinAlgError):
                B = A.T @ Pq
            P = Pq
        # C(A) = P B^T.  If A = X: frame P=P, Q=B. If A = X^T: C(X) = B P^T: frame P=B, Q=P.
        Pf, Qf = (B, P) if m <= n else (P, B)
        if cpu:
            Pf = torch.from_numpy(np.ascontiguousarray(Pf, dtype=np.float32))
            Qf = torch.from_numpy(np.ascontiguousarray(Qf, dtype=np.float32))
        return Pf, Qf

    def _roundtrip(self, v):
        buf = b"".join(self.codec.encode(v, 0))
        return self.codec.decode(memoryview(buf), 0, v.numel(), "rankk")

    def decode(self, frame, shape, device="cpu"):
        mv = _mv(frame)
        d = self._check_header(mv, shape)
        what = "rankk frame"
        if len(mv) < self.FIXED:
            raise FrameError(f"{what}: truncated, {len(mv)} bytes but the fixed part needs {self.FIXED}")
        r = _U32.unpack_from(mv, HEADER_SIZE)[0]
        shape = _as_shape(shape)
        if r == 0:
            self._check_len(what, mv, self.FIXED + self.codec.size(d))
            return self._out(self.codec.decode(mv, self.FIXED, d, what), shape, device)
        _, m, n, _ = self._geom(shape)
        if m == 0:
            raise FrameError(f"{what}: rank {r} factors for shape {shape}, which is not a matrix"
                             + (f" stack of {self.experts} experts" if self.experts > 1 else ""))
        if r > min(m, n):
            raise FrameError(f"{what}: rank {r} exceeds min(m, n) = {min(m, n)} for a {m} x {n} matrix")
        e = self.experts
        sp = self.codec.size(e * m * r)
        self._check_len(what, mv, self.FIXED + sp + self.codec.size(e * n * r))
        P = self.codec.decode(mv, self.FIXED, e * m * r, what).reshape(e, m, r)
        Q = self.codec.decode(mv, self.FIXED + sp, e * n * r, what).reshape(e, n, r)
        PQ = P @ np.swapaxes(Q, 1, 2) if e > 1 else P[0] @ Q[0].T
        out = torch.from_numpy(np.ascontiguousarray(PQ, dtype=np.float32)).reshape(shape)
        return out if str(device) == "cpu" else out.to(device)


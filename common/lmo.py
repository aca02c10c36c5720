"""Linear minimisation oracles (LMOs) for the Muon / Scion / Gluon family, one per layer norm.

Every layer i of the model carries a norm ||.||_(i) (chosen by a preset, DESIGN.md §3) and the
server's step is

    X_i  <-  X_i + t_i * lmo_i(G_i),      lmo_i(G) = scale_i * argmin_{||Z||_(i) <= 1} <G, Z>.

So a direction returned here already points *downhill* (it is the negative of what Muon/Scion code
usually calls "the update", which they subtract).  Unit balls, their LMOs and dual norms, for a
layer whose weight is viewed as a matrix G of shape (rows, cols) = (d_out, d_in) (PyTorch (out, in);
conv filters (out, in, k, k) are flattened to (out, in*k*k)):

    norm        ||Z||                      argmin_{||Z||<=1} <G, Z>        ||G||_* (dual)
    spectral    sigma_max(Z)               -U V^T   (G = U S V^T)          sum_i sigma_i(G)  (nuclear)
    sign        max_ij |Z_ij|              -sign(G)                        sum_ij |G_ij|     (l1)
    colnorm     max_j ||Z[:, j]||_2        -G[:, j] / ||G[:, j]||_2        sum_j ||G[:, j]||_2
    rownorm     max_i ||Z[i, :]||_2        -G[i, :] / ||G[i, :]||_2        sum_i ||G[i, :]||_2
    bias_rms    rms(Z) = ||Z||_2/sqrt(n)   -G / rms(G)                     sqrt(n) ||G||_2

The polar factor U V^T is approximated by a Newton-Schulz iteration (KellerJordan/Muon's quintic or
the Polar Express schedule), so the spectral LMO and its dual norm are approximate; see
`newton_schulz` for the band the singular values land in.  All other LMOs are exact (up to eps).

Scales (`LayerSpec.scale`) follow the reference implementations (rows = d_out, cols = d_in):
    spectral  muon:      sqrt(max(1, rows/cols))        (KellerJordan/Muon, torch "original")
              scion:     sqrt(rows/cols)                (Scion Spectral(normalized=True), Gluon unScion)
              moonlight: 0.2 * sqrt(max(rows, cols))    (Moonlight / torch "match_rms_adamw")
    sign      1/d_in                                    (Scion Sign(normalized=True); Gluon's n_p)
    colnorm   sqrt(d_out)                               (Scion ColNorm(normalized=False))
    rownorm   1/sqrt(d_in)                              (Scion RowNorm(normalized=True))
    bias_rms  1                                         (Scion BiasRMS)
Conv filters use the flattened (out, in*k*k) shape for the spectral scale, i.e. sqrt(out/in)/k for
'scion'; Scion's SpectralConv uses sqrt(out/in)/k^2 instead -- pass "spectral:<float>" to match it.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = [
    "NORMS",
    "SCALE_RULES",
    "PRESETS",
    "NS_COEFFICIENTS",
    "SCION_SIGN_LR_MULT",
    "LayerSpec",
    "SpectralGroup",
    "available_cores",
    "matrix_dims",
    "newton_schulz",
    "ns_scalar_map",
    "ns_singular_value_band",
    "lmo_direction",
    "lmo_all",
    "lmo_threads",
    "ns_step_flops",
    "spectral_groups",
    "dual_norm",
    "spectral_scale",
    "assign_norms",
    "assign_norms_for_model",
]

NORMS = ("spectral", "sign", "colnorm", "rownorm", "bias_rms")
SCALE_RULES = ("muon", "scion", "moonlight")
PRESETS = ("muon", "scion", "gluon", "muonmax")

# preset -> scale rule of its spectral layers.  gluon uses Scion's norms (its adaptive layer-wise
# step sizes live in the step-size schedule, not here); muonmax uses Muon's norms (its global step
# scaled by the sum of nuclear norms lives in the step-size schedule too).
_PRESET_SCALE_RULE = {"muon": "muon", "scion": "scion", "gluon": "scion", "muonmax": "muon"}

# Scion's nanoGPT config gives the Sign (tied embedding / lm_head) group a radius 60x the blocks'
# (scale 3000 vs 50; CNN example: 16x).  We do NOT make it the default (default lr_mult is 1.0 for
# every norm: one global step size, as in the EF21-Muon / Gluon analysis); tasks that want Scion's
# tuning pass lr_mult={"sign": SCION_SIGN_LR_MULT}.
SCION_SIGN_LR_MULT = 60.0

# Quintic Newton-Schulz schedules: one (a, b, c) per step,  X <- a X + b (X X^T) X + c (X X^T)^2 X.
NS_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    # KellerJordan/Muon: the same triple on every step.
    "jordan": ((3.4445, -4.7750, 2.0315),),
    # Polar Express (Amsel et al., arXiv 2505.16932), as in modded-nanogpt record #40:
    # computed for num_iters=5, safety_factor=2e-2, cushion=2.  Steps beyond 5 repeat the last.
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
# Normalisation X / (||X||_F * factor + eps) applied before the first step.
_NS_NORMALISATION = {"jordan": (1.0, 1e-7), "polar_express": (1.0 + 2e-2, 1e-6)}

_EPS = 1e-12  # guards the column/row/rms divisions (computed in fp32 or wider)


# --------------------------------------------------------------------------------------------
# Layer description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One layer's geometry: lmo(G) = scale * argmin_{||Z||_(norm) <= 1} <G, Z>.

    `scale` already includes the scale rule (e.g. sqrt(max(1, rows/cols)) for Muon spectral
    layers, 1/d_in for sign layers).  `lr_mult` multiplies the global step size t for this layer
    (X_i += lr_mult * t * lmo_i(G_i)); it is applied by the step, not by `lmo_direction`.
    """

    name: str
    shape: tuple[int, ...]
    norm: str
    scale: float
    lr_mult: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.norm not in NORMS:
            raise ConfigError(
                f"layer {self.name!r}: unknown norm {self.norm!r}; valid norms are {', '.join(NORMS)}"
            )
        if self.norm == "spectral" and len(self.shape) < 2:
            raise ConfigError(
                f"layer {self.name!r}: the spectral norm needs a parameter with >= 2 dims, got shape "
                f"{self.shape}; use bias_rms (or sign) for vectors and scalars"
            )
        for field in ("scale", "lr_mult"):
            v = float(getattr(self, field))
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"layer {self.name!r}: {field} must be a finite number > 0, got {v}")
            object.__setattr__(self, field, v)


def matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) = (d_out, d_in) of the matrix view of a parameter of this shape.

    >= 2-D: (shape[0], prod(shape[1:]))  (conv (out, in, k, k) -> (out, in*k*k));
    1-D (n,): (n, 1), a column;  0-D: (1, 1).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], math.prod(shape[1:])


def _as_matrix(G: Tensor) -> Tensor:
    rows, cols = matrix_dims(G.shape)
    return G.reshape(rows, cols)


# --------------------------------------------------------------------------------------------
# Newton-Schulz
# --------------------------------------------------------------------------------------------


def _schedule(coeffs: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    if coeffs not in NS_COEFFICIENTS:
        raise ConfigError(
            f"unknown Newton-Schulz coefficients {coeffs!r}; valid: {', '.join(NS_COEFFICIENTS)}"
        )
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"Newton-Schulz steps must be an int >= 0, got {steps!r}")
    table = NS_COEFFICIENTS[coeffs]
    return tuple(table[min(k, len(table) - 1)] for k in range(steps))


def ns_scalar_map(sigma: Tensor, steps: int = 5, coeffs: str = "jordan") -> Tensor:
    """What Newton-Schulz does to one (already normalised) singular value.

        s_0 = sigma,   s_{k+1} = a_k s_k + b_k s_k^3 + c_k s_k^5.

    NS(G) = U diag(p(sigma_i / nu)) V^T exactly (in exact arithmetic), where p is this map and
    nu = ||G||_F (jordan) or 1.02 ||G||_F (polar_express).  Polar Express's 1.02 is folded in
    here: pass sigma / ||G||_F for both schedules.
    """
    factor, _ = _NS_NORMALISATION[coeffs] if coeffs in _NS_NORMALISATION else (1.0, 0.0)
    s = sigma / factor
    for a, b, c in _schedule(coeffs, steps):
        s2 = s * s
        s = s * (a + s2 * (b + c * s2))
    return s


def ns_singular_value_band(
    lo: float, hi: float = 1.0, steps: int = 5, coeffs: str = "jordan", points: int = 200_001
) -> tuple[float, float]:
    """(min, max) of `ns_scalar_map` over sigma in [lo, hi] (log grid, float64).

    Examples (5 steps): jordan [1e-2, 1] -> (0.682, 1.134); polar_express [1e-2, 1] -> (0.859, 1.141)
    (printed by the tests).  After Frobenius normalisation sigma_max/||G||_F is in [1/sqrt(r), 1]
    (r = rank), so a matrix with sigma_min/sigma_max >= kappa has normalised singular values in
    [kappa/sqrt(r), 1].
    """
    grid = torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64)
    out = ns_scalar_map(grid, steps, coeffs)
    return float(out.min()), float(out.max())


def newton_schulz(
    G: Tensor, steps: int = 5, coeffs: str = "jordan", dtype: torch.dtype | None = None
) -> Tensor:
    """Approximate polar factor U V^T of G = U S V^T, batched over leading dims of (..., m, n).

        X_0     = G / (||G||_F + 1e-7)                       ('jordan')
                  G / (||G||_F * 1.02 + 1e-6)                 ('polar_express')
        A_k     = X_k X_k^T
        X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k  =  U diag(p_k(s)) V^T

    with (a, b, c) = (3.4445, -4.7750, 2.0315) on every step ('jordan', KellerJordan/Muon) or the
    5-step Polar Express schedule (steps > 5 repeat its last triple).  When m > n the iteration uses
    A_k = X_k^T X_k and X_{k+1} = a_k X_k + X_k (b_k A_k + c_k A_k^2) (the same polynomial, no
    transpose materialised), so the Gram matrix is always min(m, n)^2.  The result is U S' V^T, not
    exactly U V^T: for normalised singular values in [1e-2, 1], 5 jordan steps give S' in
    [0.682, 1.134] and 5 Polar Express steps give [0.859, 1.141] (see `ns_singular_value_band`).
    A zero G maps to zero.

    dtype: compute dtype; default bfloat16 on CUDA (as every reference does), float32 elsewhere.
    The result has G's dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    schedule = _schedule(coeffs, steps)
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    lead, (m, n) = G.shape[:-2], G.shape[-2:]
    X = G.reshape(-1, m, n).to(dtype, copy=True)  # our own buffer: normalised in place below
    _normalise_(X, coeffs)
    X = _ns_iterate(X, schedule, tall=m > n)
    return X.reshape(*lead, m, n).to(G.dtype)


def _normalise_(X: Tensor, coeffs: str) -> None:
    """X[i] /= ||X[i]||_F * factor + eps, in place, for a (batch, m, n) X (zero padding changes no norm)."""
    factor, eps = _NS_NORMALISATION[coeffs]
    d = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X.div_(d.mul_(factor).add_(eps))


def _ns_iterate(X: Tensor, schedule, tall: bool) -> Tensor:
    """The quintic steps on a normalised (batch, m, n) X that the caller owns (it is overwritten).

    Per step: A = X X^T (bmm), B = b A + c A A (one baddbmm: beta/alpha do the scaling), then
    X' = a X + B X.  In fp32/fp64 that is B += a I (the diagonal only) and X' = B X, one bmm that
    never copies X (baddbmm(X, B, X, beta=a) copies X into its output first: a full pass over the
    largest operand each step).  In 16-bit formats a ~3.4 + B_ii would lose B's diagonal to rounding,
    so there X' = baddbmm(X, B, X, beta=a) as in the references.  Buffers are allocated once per
    call; X / X' swap.  Tall X (m > n) multiplies on the right (X^T X, X B): no transpose."""
    r = X.size(-1) if tall else X.size(-2)
    A = X.new_empty(X.size(0), r, r)
    B = torch.empty_like(A)
    fold = X.dtype in (torch.float32, torch.float64)
    diag = B.diagonal(dim1=-2, dim2=-1)
    Y = torch.empty_like(X)
    for a, b, c in schedule:
        if tall:
            torch.bmm(X.mT, X, out=A)
        else:
            torch.bmm(X, X.mT, out=A)
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
        if fold:
            diag.add_(a)
        left, right = (X, B) if tall else (B, X)
        if fold:
            torch.bmm(left, right, out=Y)
        else:
            torch.baddbmm(X, left, right, beta=a, out=Y)
        X, Y = Y, X
    return X


# The fixed cost of one more Newton-Schulz batch, in FLOPs of one step: each batch makes ~4 calls
# per step (Gram, b A + c A^2, diagonal, product) of ~5-10 us each, i.e. ~2 MFLOP at ~60 GFLOP/s
# (one core here).  `spectral_groups` zero-pads matrices into a common batch only while the FLOPs
# spent on zeros stay below the calls it saves, so only tiny matrices are ever padded.
PAD_CALL_FLOPS = 2_000_000


def ns_step_flops(m: int, n: int) -> int:
    """FLOPs of one Newton-Schulz step on an m x n matrix (the iteration runs on min x max):
    Gram 2 r^2 s;  b A + c A A: 2 r^3;  a X + B X: 2 r^2 s  (r = min(m, n), s = max(m, n))."""
    r, s = min(m, n), max(m, n)
    return 4 * r * r * s + 2 * r * r * r


@dataclass(frozen=True)
class SpectralGroup:
    """One Newton-Schulz call of `lmo_all`: layers `idx` (positions in the shape list) run as one
    (len(idx), rows, cols) batch (rows <= cols when padded).  padded: the members' shapes differ (the long
    side shorter than cols, or tall ones among wide ones), so each is copied into a zeroed (rows, cols)
    slot, tall ones transposed; otherwise all are exactly (rows, cols) or all exactly (cols, rows)."""

    idx: tuple[int, ...]
    rows: int
    cols: int
    padded: bool

    @property
    def step_flops(self) -> int:
        """FLOPs of one step as executed (padded shape x batch)."""
        return len(self.idx) * ns_step_flops(self.rows, self.cols)


def spectral_groups(shapes: Sequence[tuple[int, int]]) -> list[SpectralGroup]:
    """How `lmo_all` batches spectral matrices of these (rows, cols) shapes (one dtype and device).

    Matrices with the same short side r are sorted by their long side and cut into consecutive
    batches so that FLOPs executed (each batch at its longest member's size) + PAD_CALL_FLOPS per batch
    is smallest (an exact dynamic programme).  Same-size matrices thus share a batch whatever their
    orientation, and tiny ones (gpt-char's <= 64x256) share one even with different long sides.
    Zero padding along the long side is exact: [X 0] has X's Frobenius norm and Gram matrix, and
    every step maps it to [X' 0].  The short side is never padded (that changed fp32 rounding by
    ~1e-6 in the tests; padding the long side changed nothing)."""
    by_short: dict[int, list[int]] = {}
    for i, (m, n) in enumerate(shapes):
        by_short.setdefault(min(m, n), []).append(i)
    groups: list[SpectralGroup] = []
    for r, idx in by_short.items():
        idx = sorted(idx, key=lambda i: max(shapes[i]))
        longs = [max(shapes[i]) for i in idx]
        best = [0.0] + [math.inf] * len(idx)  # best[j]: cheapest cut of the first j matrices
        cut = [0] * (len(idx) + 1)
        for j in range(1, len(idx) + 1):
            for i in range(j):
                cost = best[i] + (j - i) * ns_step_flops(r, longs[j - 1]) + PAD_CALL_FLOPS
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        j = len(idx)
        batches = []
        while j > 0:
            batches.append(idx[cut[j]:j])
            j = cut[j]
        for members in reversed(batches):
            kinds = {tuple(shapes[i]) for i in members}
            rows, cols = next(iter(kinds)) if len(kinds) == 1 else (r, max(shapes[members[-1]]))
            groups.append(SpectralGroup(tuple(members), rows, cols, len(kinds) > 1))
    return groups


def _ns_group(Gs: Sequence[Tensor], group: SpectralGroup, steps: int, coeffs: str) -> list[Tensor]:
    """Newton-Schulz of every matrix (2-D views) of one group: per matrix a view of the batch's
    result (compute dtype) in the matrix's own shape, the padding cut off; the caller copies it out."""
    G0 = Gs[0]
    dtype = torch.bfloat16 if G0.is_cuda else torch.float32
    schedule = _schedule(coeffs, steps)
    k, rows, cols = len(Gs), group.rows, group.cols
    if group.padded:
        full = all(max(G.shape) == cols for G in Gs)  # only orientations differ: nothing to zero
        X = (torch.empty if full else torch.zeros)(k, rows, cols, dtype=dtype, device=G0.device)
        for j, G in enumerate(Gs):
            m, n = G.shape
            X[j, :, : max(m, n)].copy_(G.mT if m > n else G)  # the stacking copy, transposed if tall
        _normalise_(X, coeffs)
        X = _ns_iterate(X, schedule, tall=False)
        outs = []
        for j, G in enumerate(Gs):
            m, n = G.shape
            outs.append(X[j, :, :m].mT if m > n else X[j, :, :n])
        return outs
    X = torch.stack(Gs) if G0.dtype == dtype else torch.stack([G.to(dtype) for G in Gs])
    _normalise_(X, coeffs)
    X = _ns_iterate(X, schedule, tall=rows > cols)
    return list(X.unbind(0))


# --------------------------------------------------------------------------------------------
# LMOs
# --------------------------------------------------------------------------------------------


def _check(G: Tensor, spec: LayerSpec) -> None:
    if tuple(G.shape) != spec.shape:
        raise ValueError(
            f"layer {spec.name!r}: tensor shape {tuple(G.shape)} does not match spec shape {spec.shape}"
        )


def _wide(G: Tensor) -> Tensor:
    """fp32 (or wider) copy of G for the norm computations, so eps guards survive fp16/bf16."""
    return G if G.dtype in (torch.float32, torch.float64) else G.float()


def _unit_sign(G: Tensor) -> Tensor:
    """argmin_{max|Z_ij| <= 1} <G, Z> = -sign(G)   (zeros stay zero)."""
    return -torch.sign(G)


def _unit_colnorm(G: Tensor) -> Tensor:
    """argmin_{max_j ||Z[:,j]||_2 <= 1} <G, Z> = -G[:,j] / ||G[:,j]||_2 per column."""
    M = _wide(_as_matrix(G))
    M = M / M.norm(dim=0, keepdim=True).clamp_min(_EPS)
    return (-M).reshape(G.shape).to(G.dtype)


def _unit_rownorm(G: Tensor) -> Tensor:
    """argmin_{max_i ||Z[i,:]||_2 <= 1} <G, Z> = -G[i,:] / ||G[i,:]||_2 per row."""
    M = _wide(_as_matrix(G))
    M = M / M.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return (-M).reshape(G.shape).to(G.dtype)


def _unit_bias_rms(G: Tensor) -> Tensor:
    """argmin_{rms(Z) <= 1} <G, Z> = -G / rms(G),  rms(G) = sqrt(mean G^2)."""
    W = _wide(G)
    rms = W.square().mean().sqrt().clamp_min(_EPS)
    return (-W / rms).to(G.dtype)


def _unit_spectral(G: Tensor, ns_steps: int, coeffs: str) -> Tensor:
    """argmin_{sigma_max(Z) <= 1} <G, Z> = -U V^T  (via Newton-Schulz on the (out, rest) view)."""
    return (-newton_schulz(_as_matrix(G), ns_steps, coeffs)).reshape(G.shape)


def _unit_lmo(G: Tensor, norm: str, ns_steps: int, coeffs: str) -> Tensor:
    if G.numel() == 0:
        return torch.zeros_like(G)
    if norm == "spectral":
        return _unit_spectral(G, ns_steps, coeffs)
    if norm == "sign":
        return _unit_sign(G)
    if norm == "colnorm":
        return _unit_colnorm(G)
    if norm == "rownorm":
        return _unit_rownorm(G)
    if norm == "bias_rms":
        return _unit_bias_rms(G)
    raise ConfigError(f"unknown norm {norm!r}; valid norms are {', '.join(NORMS)}")


def lmo_direction(G: Tensor, spec: LayerSpec, ns_steps: int = 5, coeffs: str = "jordan") -> Tensor:
    """lmo(G) = spec.scale * argmin_{||Z||_(spec.norm) <= 1} <G, Z>   (a descent direction).

    spectral: -scale * NS(G)  (~ -scale * U V^T; conv (out, in, k, k) via the (out, in*k*k) view)
    sign:     -scale * sign(G)
    colnorm:  -scale * G[:,j] / ||G[:,j]||_2      rownorm: -scale * G[i,:] / ||G[i,:]||_2
    bias_rms: -scale * G / rms(G)
    A zero G gives a zero direction.  The result has G's shape and dtype.
    """
    _check(G, spec)
    return _unit_lmo(G, spec.norm, ns_steps, coeffs) * spec.scale


def lmo_all(
    Gs: Sequence[Tensor],
    specs: Sequence[LayerSpec],
    ns_steps: int = 5,
    coeffs: str = "jordan",
    threads: int | None = None,
) -> list[Tensor]:
    """[lmo_direction(G, s) for G, s in zip(Gs, specs)], with spectral layers batched.

    Spectral layers (per dtype and device) are batched as `spectral_groups` says: same-size matrices
    of either orientation in one Newton-Schulz call, tiny ones of different long sides zero-padded
    into one when that saves more than it costs.  The result equals the per-layer one to float
    rounding; every direction is a fresh contiguous tensor.

    threads: torch intra-op threads for the Newton-Schulz products; None = `lmo_threads(flops)`
    (every core this process may use once the work is large enough).  The thread count is restored
    afterwards.  The simulator and the networked server both step through this function, so they
    use the same count on the same machine.
    """
    if len(Gs) != len(specs):
        raise ValueError(f"lmo_all: {len(Gs)} tensors but {len(specs)} layer specs")
    out: list[Tensor | None] = [None] * len(Gs)
    by_kind: dict[tuple, list[int]] = {}
    for i, (G, spec) in enumerate(zip(Gs, specs)):
        _check(G, spec)
        if spec.norm == "spectral" and G.numel() > 0:
            by_kind.setdefault((G.dtype, G.device), []).append(i)
        else:
            out[i] = lmo_direction(G, spec, ns_steps, coeffs)
    plan = [(idx, g) for idx in by_kind.values()
            for g in spectral_groups([matrix_dims(specs[i].shape) for i in idx])]
    if threads is None:
        threads = lmo_threads(ns_steps * sum(g.step_flops for _, g in plan))
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        for idx, group in plan:
            members = [idx[j] for j in group.idx]
            mats = [_as_matrix(Gs[i]) for i in members]
            for i, O in zip(members, _ns_group(mats, group, ns_steps, coeffs)):
                D = torch.empty(O.shape, dtype=Gs[i].dtype, device=O.device)
                torch.mul(O, -specs[i].scale, out=D)  # = (-O) * scale exactly, cast and made contiguous
                out[i] = D.view(specs[i].shape)
    finally:
        if threads != previous:
            torch.set_num_threads(previous)
    return out  # type: ignore[return-value]


# Newton-Schulz work (FLOPs per lmo_all call) from which `lmo_threads` uses every available core:
# below it (e.g. gpt-char's ~150 MFLOP) waking and joining threads costs more than it saves.
LMO_PARALLEL_MIN_FLOPS = 1 << 30


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def lmo_threads(flops: float) -> int:
    """Intra-op threads for `flops` of Newton-Schulz: every available core for large work, else the
    process's current setting (configure_torch's --threads).  In a synchronous round nothing else
    of the run computes while the server takes its step, so the cores are otherwise idle.  On the
    CPUs tested, MKL's sgemm and the norm give bit-identical results for 1 and 2 threads on these
    shapes (tests/test_lmo.py checks it); where they might not, simulator and server still agree,
    since both decide here from the same work and the same machine.  On a machine whose cores are
    busy with other processes the extra threads wait on each other and can be slower than one."""
    if flops >= LMO_PARALLEL_MIN_FLOPS:
        return max(available_cores(), torch.get_num_threads())
    return torch.get_num_threads()


def dual_norm(
    G: Tensor,
    spec: LayerSpec,
    direction: Tensor | None = None,
    ns_steps: int = 5,
    coeffs: str = "jordan",
) -> float:
    """||G||_* of the layer's norm:  ||G||_* = max_{||Z||<=1} <G, Z> = -<G, lmo_unit(G)>.

    With `direction` (= lmo_direction(G, spec), e.g. reused from the step) this returns
    -<G, direction> / spec.scale.  Without it, the exact closed form for sign (||G||_1),
    colnorm (sum_j ||G[:,j]||_2), rownorm (sum_i ||G[i,:]||_2) and bias_rms (sqrt(n) ||G||_2),
    and -<G, -NS(G)> = sum_i sigma_i p(sigma_i / ||G||_F) for spectral.

    The spectral value is APPROXIMATE: it is the nuclear norm sum_i sigma_i weighted by the
    Newton-Schulz output singular values p(.), which lie in the band documented in `newton_schulz`
    (about [0.68, 1.13] for jordan), so the estimate lies within that factor band of the exact
    nuclear norm.  Use torch.linalg.svdvals(G).sum() when exactness matters.  Accumulates in float64.
    """
    _check(G, spec)
    if G.numel() == 0:
        return 0.0
    if direction is not None:
        if direction.shape != G.shape:
            raise ValueError(f"dual_norm: direction shape {tuple(direction.shape)} != {tuple(G.shape)}")
        return float(-(G.double() * direction.double()).sum() / spec.scale)
    g = G.double()
    if spec.norm == "sign":
        return float(g.abs().sum())
    if spec.norm == "colnorm":
        return float(_as_matrix(g).norm(dim=0).sum())
    if spec.norm == "rownorm":
        return float(_as_matrix(g).norm(dim=1).sum())
    if spec.norm == "bias_rms":
        return float(math.sqrt(g.numel()) * g.norm())
    return float(-(g * _unit_spectral(G, ns_steps, coeffs).double()).sum())


# --------------------------------------------------------------------------------------------
# Scales and presets
# --------------------------------------------------------------------------------------------


def spectral_scale(shape: Sequence[int], rule: str) -> float:
    """Scale of a spectral layer, rows = d_out = shape[0], cols = d_in = prod(shape[1:]).

    muon:      sqrt(max(1, rows/cols))      (update RMS 1/sqrt(cols) for an exact U V^T)
    scion:     sqrt(rows/cols)              (RMS->RMS operator norm of the update exactly 1)
    moonlight: 0.2 * sqrt(max(rows, cols))  (update RMS 0.2, AdamW-matched)
    """
    if rule not in SCALE_RULES:
        raise ConfigError(f"unknown spectral scale rule {rule!r}; valid rules are {', '.join(SCALE_RULES)}")
    if len(shape) < 2:
        raise ConfigError(f"spectral_scale needs a shape with >= 2 dims, got {tuple(shape)}")
    rows, cols = matrix_dims(shape)
    if rule == "muon":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "scion":
        return math.sqrt(rows / cols)
    return 0.2 * math.sqrt(max(rows, cols))


def _default_scale(shape: tuple[int, ...], norm: str, rule: str) -> float:
    rows, cols = matrix_dims(shape)
    if norm == "spectral":
        return spectral_scale(shape, rule)
    if norm == "sign":
        return 1.0 / cols  # Scion Sign(normalized=True): sign(G) / d_in
    if norm == "colnorm":
        return math.sqrt(rows)  # Scion ColNorm(normalized=False): G / (||col||_2 / sqrt(d_out))
    if norm == "rownorm":
        return 1.0 / math.sqrt(cols)  # Scion RowNorm(normalized=True): G / (||row||_2 sqrt(d_in))
    return 1.0  # bias_rms


EMBEDDING_PATTERN = re.compile(
    r"(^|\.)(\w*embed\w*|wte|wpe|tok_emb\w*|pos_emb\w*)(\.|$)", re.IGNORECASE
)
HEAD_PATTERN = re.compile(r"(^|\.)(lm_head|head|classifier|output)\.weight$", re.IGNORECASE)


def _pattern_matches(pattern: str, name: str) -> bool:
    """fnmatch (case-sensitive) on the full name, or a regex that fully matches the name."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _parse_override(pattern: str, value: str, rule: str) -> tuple[str, str | float]:
    """'norm' | 'norm:scale_rule' (spectral only) | 'norm:<float>' -> (norm, rule or scale)."""
    norm, _, extra = str(value).partition(":")
    norm = norm.strip()
    extra = extra.strip()
    if norm not in NORMS:
        raise ConfigError(
            f"override {pattern!r}: unknown norm {norm!r}; valid norms are {', '.join(NORMS)} "
            f"(optionally 'spectral:<{'|'.join(SCALE_RULES)}>' or '<norm>:<scale>')"
        )
    if not extra:
        return norm, rule
    if extra in SCALE_RULES:
        if norm != "spectral":
            raise ConfigError(
                f"override {pattern!r}: scale rule {extra!r} applies to spectral layers only; "
                f"give '{norm}:<number>' for an explicit scale"
            )
        return norm, extra
    try:
        return norm, float(extra)
    except ValueError:
        raise ConfigError(
            f"override {pattern!r}: {extra!r} is neither a scale rule ({', '.join(SCALE_RULES)}) "
            f"nor a number"
        ) from None


def assign_norms(
    named_shapes: Iterable[tuple[str, Sequence[int]]],
    preset: str = "muon",
    overrides: Mapping[str, str] | None = None,
    embedding_names: Iterable[str] = frozenset(),
    head_names: Iterable[str] = frozenset(),
    lr_mult: Mapping[str, float] | None = None,
) -> list[LayerSpec]:
    """One LayerSpec per (name, shape), in order.

    Automatic choice (first rule that applies):
      1. `overrides`: {pattern: "norm" | "norm:scale_rule" | "norm:<scale>"}; patterns are fnmatch
         globs or regexes (full match) on the parameter name; the first matching pattern wins.
      2. 0-D and 1-D parameters (biases, gains, scalars) -> bias_rms.
      3. embeddings and heads -> sign: names in `embedding_names` / `head_names`, or matching
         EMBEDDING_PATTERN (a name component containing 'embed', or wte/wpe/tok_emb*/pos_emb*) or
         HEAD_PATTERN ('lm_head|head|classifier|output' + '.weight' at the end).
      4. everything else (hidden 2-D matrices, conv filters) -> spectral.
    Presets choose the spectral scale rule: muon/muonmax -> 'muon', scion/gluon -> 'scion'.
    Other scales: sign 1/d_in, colnorm sqrt(d_out), rownorm 1/sqrt(d_in), bias_rms 1.

    lr_mult: {norm: multiplier}; default 1.0 for every norm.  Scion's own configs give sign
    (embedding/head) layers a ~60x larger radius (SCION_SIGN_LR_MULT); we leave that to the task.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets are {', '.join(PRESETS)}")
    rule = _PRESET_SCALE_RULE[preset]
    mults = {norm: 1.0 for norm in NORMS}
    for norm, mult in (lr_mult or {}).items():
        if norm not in NORMS:
            raise ConfigError(f"lr_mult: unknown norm {norm!r}; valid norms are {', '.join(NORMS)}")
        mults[norm] = float(mult)
    parsed = [(pat, *_parse_override(pat, val, rule)) for pat, val in (overrides or {}).items()]
    embedding_names = set(embedding_names)
    head_names = set(head_names)

    specs: list[LayerSpec] = []
    seen: set[str] = set()
    for name, shape in named_shapes:
        if name in seen:
            raise ConfigError(f"parameter name {name!r} appears twice")
        seen.add(name)
        shape = tuple(int(s) for s in shape)
        scale_choice: str | float = rule
        for pat, norm, choice in parsed:
            if _pattern_matches(pat, name):
                scale_choice = choice
                break
        else:
            if len(shape) <= 1:
                norm = "bias_rms"
            elif (
                name in embedding_names
                or name in head_names
                or EMBEDDING_PATTERN.search(name)
                or HEAD_PATTERN.search(name)
            ):
                norm = "sign"
            else:
                norm = "spectral"
        if norm == "spectral" and len(shape) < 2:
            raise ConfigError(
                f"parameter {name!r} has shape {shape}; the spectral norm needs >= 2 dims"
            )
        if isinstance(scale_choice, float):
            scale = scale_choice
        else:
            scale = _default_scale(shape, norm, scale_choice)
        specs.append(LayerSpec(name, shape, norm, scale, mults[norm]))
    return specs


def assign_norms_for_model(
    model: torch.nn.Module,
    preset: str = "muon",
    overrides: Mapping[str, str] | None = None,
    head_names: Iterable[str] = frozenset(),
    lr_mult: Mapping[str, float] | None = None,
) -> list[LayerSpec]:
    """assign_norms over model.named_parameters() (that order), with every nn.Embedding /
    nn.EmbeddingBag weight treated as an embedding (sign) regardless of its name."""
    embedding_names = {
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    }
    named_shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return assign_norms(
        named_shapes,
        preset=preset,
        overrides=overrides,
        embedding_names=embedding_names,
        head_names=head_names,
        lr_mult=lr_mult,
    )

"""Compressors of EF21-Muon: tensors <-> exact, self-describing byte frames.

Public API::

    comp = parse_spec("topk:0.05+natural")
    frame = comp.encode(x, seed)              # bytes, deterministic given (x, seed)
    xhat = comp.decode(frame, x.shape)        # float32 tensor of that shape
    len(frame) == comp.frame_size(x.shape, comp.frame_layout(frame))
    comp.alpha(x.shape)                       # E||C(x)-x||^2 <= (1-alpha)||x||^2 for C as used

A compressor is a *structure* (which entries / which subspace is sent) followed by a *value codec*
(how the sent numbers are written).

Structures: ``identity`` (all entries), ``topk:F|K`` (k largest |x|), ``randk:F|K`` (k entries drawn
from ``seed``; the frame carries the seed and no indices), ``rankk:R`` (rank-R factors P Q^T).
Value codecs: ``fp32`` (default, omitted from spellings), ``bf16``, ``fp16``, ``natural`` (sign +
8-bit exponent, stochastic rounding to a power of two), ``quant:B[:BLOCK]`` (B bits, per-block fp32
max-abs scale, deterministic round-to-nearest), ``sign[:BLOCK]`` (scaled sign, 1 bit/entry).

Spellings (canonical forms): ``identity``, ``identity:bf16``, ``identity:fp16``, ``natural``,
``quant:8``, ``quant:4:64``, ``sign``, ``sign:128``, ``topk:0.1``, ``topk:1000``, ``randk:0.1``,
``rankk:4``, and ``STRUCTURE+CODEC`` such as ``topk:0.05+natural``, ``topk:0.1+bf16``,
``rankk:4+bf16``, ``randk:0.1+quant:8``.

Unbiased operators inside EF21 (contractive as used)
----------------------------------------------------
EF21 needs contractive compressors.  Unbiased operators U with E||U(x)-x||^2 <= omega ||x||^2 are
used scaled by 1/(1+omega), which gives alpha = 1/(1+omega):

* randk: raw operator (d/k)*mask(x) is unbiased with omega = d/k - 1; as used it is scaled by
  k/d, i.e. it is the plain mask, E||mask(x)-x||^2 = (1 - k/d)||x||^2: alpha = k/d.
* natural: raw stochastic power-of-two rounding is unbiased with omega = 1/8; ``decode`` returns it
  scaled by 8/9: alpha = 8/9.
* quant uses deterministic nearest rounding (biased, contractive directly, see ``QuantCodec``).

``Compressor.unbiased`` reports the raw operator's property; ``Compressor.contractive`` is True for
every compressor as used.

Frame header (all frames, little-endian, 18 bytes)::

    0  2s  magic b"EF"
    2  u8  frame version (1)
    3  u8  structure id   (0 identity, 1 topk, 2 randk, 3 rankk)
    4  u8  value codec id (0 fp32, 1 bf16, 2 fp16, 3 natural, 4 quant, 5 sign)
    5  u8  codec bits (quant: 2..16, else 0)
    6  u32 codec block (quant / sign: block length, 0 = whole vector for sign; else 0)
    10 u64 numel (number of entries of the tensor)

followed by the structure's fields and payload (see each structure class).  Decoding checks every
field against this compressor and the caller's shape *before* allocating anything, checks the exact
frame length, index ranges and scale finiteness, and raises ``FrameError`` saying what was wrong.

Seeds: ``seed`` is an int64 (or uint64); it is reduced modulo 2**64.  Random draws use numpy's
PCG64 generator, so randk frames decode identically on any machine with the same numpy stream
(numpy keeps PCG64's ``random_raw`` stream stable).
"""

from __future__ import annotations

import math
import re
import struct
import sys

import numpy as np
import torch

from .errors import ConfigError, FrameError

__all__ = [
    "Compressor",
    "parse_spec",
    "encode_decode",
    "VALID_FORMS",
    "HEADER_SIZE",
]

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("efmuon.common.compress assumes a little-endian host")

MAGIC = b"EF"
VERSION = 1
_HEADER = struct.Struct("<2sBBBBIQ")
HEADER_SIZE = _HEADER.size  # 18
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_MASK64 = (1 << 64) - 1

VALID_FORMS = (
    "identity, identity:bf16, identity:fp16, natural, quant:BITS (BITS 2..16), "
    "quant:BITS:BLOCK, sign, sign:BLOCK, topk:FRACTION (0<F<=1) or topk:K (integer >= 1), "
    "randk:FRACTION|K, rankk:R (integer >= 1), and STRUCTURE+CODEC with STRUCTURE in "
    "{identity, topk:.., randk:.., rankk:..} and CODEC in {fp32, bf16, fp16, natural, quant:BITS[:BLOCK], "
    "sign[:BLOCK]} (rankk takes fp32/bf16/fp16 only), e.g. topk:0.05+natural, topk:0.1+bf16, "
    "rankk:4+bf16, randk:0.1+quant:8"
)

_STRUCT_IDS = {"identity": 0, "topk": 1, "randk": 2, "rankk": 3}
_CODEC_IDS = {"fp32": 0, "bf16": 1, "fp16": 2, "natural": 3, "quant": 4, "sign": 5}
_STRUCT_NAMES = {v: k for k, v in _STRUCT_IDS.items()}
_CODEC_NAMES = {v: k for k, v in _CODEC_IDS.items()}


# ----------------------------------------------------------------------------------------------
# helpers


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _subseed(seed: int, tag: int) -> int:
    return _splitmix64((int(seed) & _MASK64) ^ _splitmix64(tag))


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(int(seed) & _MASK64))


def _random_u32(seed: int, n: int) -> np.ndarray:
    """n uniform uint32 values from PCG64(seed) (fast path: raw 64-bit draws split in two)."""
    raw = _rng(seed).bit_generator.random_raw((n + 1) // 2)
    return raw.view(np.uint32)[:n]


def _numel(shape) -> int:
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError as e:
        raise FrameError(f"shape {shape!r} is not a sequence of ints") from e
    if any(s < 0 for s in dims):
        raise FrameError(f"shape {dims} has a negative dimension")
    return math.prod(dims)


def _as_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        return tuple(shape)
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(s) for s in shape)


def _flat_f32(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    return x.reshape(-1)


def _np_cpu(t: torch.Tensor) -> np.ndarray:
    return t.to("cpu").contiguous().numpy()


def _mv(frame) -> memoryview:
    try:
        mv = memoryview(frame)
    except TypeError as e:
        raise FrameError(f"frame must be bytes-like, got {type(frame).__name__}") from e
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    return mv


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _qr(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal factor of a reduced QR.  On CPU via numpy's LAPACK, which for the thin matrices
    used here is ~100x faster than torch.linalg.qr under thread contention."""
    if isinstance(a, np.ndarray):
        return np.linalg.qr(a, mode="reduced")[0].astype(np.float32, copy=False)
    return torch.linalg.qr(a).Q


_CHUNK = 1 << 16  # elements per chunk of the fused single-pass loops (fits L2 with its temporaries)


def _kth_keep(cv: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask over cv keeping exactly its k largest values, ties by lower position."""
    c = cv.size
    tau = np.partition(cv, c - k)[c - k]
    keep = cv > tau
    need = k - int(np.count_nonzero(keep))
    if need > 0:
        keep[np.flatnonzero(cv == tau)[:need]] = True
    return keep


def _select_largest_np(x: np.ndarray, k: int, use_abs: bool) -> np.ndarray:
    """numpy version of _select_largest on |x| (use_abs) or x; returns strictly increasing int64.

    Exact (ties by lower index).  Large inputs: the k-th value is bracketed [lo, hi] from a strided
    sample; one chunked pass (cache-resident temporaries) gathers the candidates >= lo with their
    values; those > hi are certainly kept and the exact threshold is found by a partition of the
    few candidates inside the bracket only.  Bracket misses fall back to the full partition."""
    d = x.size
    if k >= d:
        return np.arange(d, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, np.int64)

    def full():
        a = np.abs(x) if use_abs else x
        return np.flatnonzero(_kth_keep(a, k))

    if d <= (1 << 16):
        return full()
    stride = max(1, d // 32768)
    samp = x[::stride]
    samp = np.abs(samp) if use_abs else samp.copy()
    ns = samp.size
    p = k / d
    sd = 4.0 * math.sqrt(p * (1 - p) * ns) + 8
    j = int(math.ceil(p * ns + sd))
    if j >= ns:
        return full()
    j_hi = int(math.floor(p * ns - sd))  # sample rank of the upper bracket end (may be < 1: no upper end)
    kth = [ns - j] + ([ns - j_hi] if j_hi >= 1 else [])
    part = np.partition(samp, kth)
    lo = part[ns - j]
    hi = part[ns - j_hi] if j_hi >= 1 else None
    idx_parts, val_parts = [], []
    tmp = np.empty(min(d, _CHUNK), x.dtype) if use_abs else None
    for i in range(0, d, _CHUNK):
        ch = x[i:i + _CHUNK]
        if use_abs:
            a = np.abs(ch, out=tmp[: ch.size])
        else:
            a = ch
        loc = np.flatnonzero(a >= lo)
        if loc.size:
            val_parts.append(a[loc])
            loc += i
            idx_parts.append(loc)
    if not idx_parts:
        return full()
    cand = np.concatenate(idx_parts)
    cv = np.concatenate(val_parts)
    c = cand.size
    if c < k:
        return full()
    if c == k:
        return cand
    if hi is not None:
        above = cv > hi
        n_above = int(np.count_nonzero(above))
        if n_above < k:
            band_pos = np.flatnonzero(~above)
            band = cv[band_pos]
            sub = _kth_keep(band, k - n_above)
            above[band_pos[sub]] = True
            return cand[above]
    return cand[_kth_keep(cv, k)]


def _select_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, strictly increasing) of exactly k largest entries of 1-D ``a``.

    Ties are broken by lower index.  Not a full sort: the k-th value is bracketed from a strided
    sample, candidates above the bracket are gathered (one pass), and the exact threshold is found by
    ``kthvalue`` on the candidates only; if the bracket misses, ``torch.topk`` is the exact fallback.
    """
    d = a.numel()
    dev = a.device
    if k >= d:
        return torch.arange(d, device=dev)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    if d <= (1 << 16):
        idx = torch.topk(a, k, sorted=False).indices
        return torch.sort(idx).values
    stride = max(1, d // 32768)
    samp = a[::stride]
    ns = samp.numel()
    p = k / d
    j = int(math.ceil(p * ns + 4.0 * math.sqrt(p * (1 - p) * ns) + 8))
    cand = None
    if j < ns:
        lo = torch.kthvalue(samp, ns - j + 1).values
        cand = torch.nonzero(a >= lo).squeeze(1)
        if cand.numel() < k:
            cand = None
    if cand is None:
        idx = torch.topk(a, k, sorted=False).indices
        return torch.sort(idx).values
    c = cand.numel()
    cv = a[cand]
    if c == k:
        return cand
    tau = torch.kthvalue(cv, c - k + 1).values
    keep = cv > tau
    need = k - int(keep.sum())
    if need > 0:
        ties = torch.nonzero(cv == tau).squeeze(1)[:need]
        keep[ties] = True
    return cand[keep]


# ---- bit packing (vectorized) ------------------------------------------------------------------


def _pack_codes(codes: np.ndarray, b: int) -> np.ndarray:
    """Pack unsigned codes (< 2**b) into ceil(n*b/8) bytes, little-endian bit order."""
    n = codes.size
    if b == 8:
        return codes.astype(np.uint8, copy=False)
    if b == 16:
        return codes.astype("<u2", copy=False).view(np.uint8)
    if 8 % b == 0:
        per = 8 // b
        pad = (-n) % per
        c = codes.astype(np.uint8, copy=False)
        if pad:
            c = np.concatenate([c, np.zeros(pad, np.uint8)])
        c = c.reshape(-1, per)
        out = c[:, 0].copy()
        tmp = np.empty_like(out)
        for j in range(1, per):
            np.left_shift(c[:, j], np.uint8(b * j), out=tmp)
            out |= tmp
        return out
    bits = ((codes.astype(np.uint32)[:, None] >> np.arange(b, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def _unpack_codes(buf: np.ndarray, n: int, b: int) -> np.ndarray:
    """Inverse of _pack_codes; returns int32 codes of length n."""
    if b == 8:
        return buf[:n].astype(np.int32)
    if b == 16:
        return buf[: 2 * n].view("<u2").astype(np.int32)
    if 8 % b == 0:
        per = 8 // b
        m = (1 << b) - 1
        out = np.empty((buf.size, per), np.uint8)
        for j in range(per):
            out[:, j] = (buf >> np.uint8(b * j)) & np.uint8(m)
        return out.reshape(-1)[:n].astype(np.int32)
    bits = np.unpackbits(buf, count=n * b, bitorder="little").reshape(n, b).astype(np.int32)
    return (bits << np.arange(b, dtype=np.int32)).sum(axis=1, dtype=np.int32)


# ---- LEB128 delta varints (vectorized) ----------------------------------------------------------


def _varint_sizes(g: np.ndarray) -> np.ndarray:
    s = np.ones(g.size, np.int64)
    if not g.size:
        return s
    gmax = int(g.max())
    for j in range(1, 10):
        if gmax < (1 << (7 * j)):
            break
        s += g >= (np.uint64(1) << np.uint64(7 * j))
    return s


def _gaps(idx: np.ndarray) -> np.ndarray:
    """idx strictly increasing int64 -> uint64 gaps: idx[0], then idx[i]-idx[i-1]-1."""
    g = np.empty(idx.size, np.uint64)
    if idx.size:
        g[0] = idx[0]
        g[1:] = np.diff(idx) - 1
    return g


def _varint_encode(g: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    maxb = int(sizes.max()) if sizes.size else 0
    if maxb <= 1:
        return g.astype(np.uint8)
    # first bytes of all values by one scatter, continuation bytes only for the (few) long values
    total = int(sizes.sum())
    out = np.empty(total, np.uint8)
    starts = np.cumsum(sizes)
    starts -= sizes
    more = sizes > 1
    b0 = g.astype(np.uint8)
    b0 &= np.uint8(0x7F)
    b0 |= more.view(np.uint8) << np.uint8(7)
    out[starts] = b0
    sel = np.flatnonzero(more)
    for j in range(1, maxb):
        gs, ss = g[sel], sizes[sel]
        byte = (gs >> np.uint64(7 * j)).astype(np.uint8)
        byte &= np.uint8(0x7F)
        byte |= (ss > j + 1).view(np.uint8) << np.uint8(7)
        out[starts[sel] + j] = byte
        sel = sel[ss > j + 1]
    return out


def _varint_decode(buf: np.ndarray, k: int, what: str) -> np.ndarray:
    """Decode exactly k LEB128 values from all of buf (uint64 array)."""
    if k == 0:
        if buf.size:
            raise FrameError(f"{what}: {buf.size} trailing bytes after 0 varint indices")
        return np.zeros(0, np.uint64)
    term = buf < 0x80
    nterm = int(np.count_nonzero(term))
    if nterm != k or not term[-1]:
        raise FrameError(
            f"{what}: varint index section holds {nterm} complete values (last byte "
            f"{'complete' if term[-1] else 'incomplete'}), expected exactly {k}"
        )
    if buf.size == k:  # every value is one byte
        return buf.astype(np.uint64)
    ends = np.flatnonzero(term)
    starts = np.empty(k, np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    maxlen = int(lens.max())
    if maxlen > 9:
        raise FrameError(f"{what}: varint longer than 9 bytes (value overflows 63 bits)")
    out = (buf[starts] & np.uint8(0x7F)).astype(np.uint64)
    sel = np.flatnonzero(lens > 1)
    for j in range(1, maxlen):
        out[sel] |= (buf[starts[sel] + j] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * j)
        sel = sel[lens[sel] > j + 1]
    return out


# ----------------------------------------------------------------------------------------------
# value codecs


class _Codec:
    cid = 0
    name = "fp32"
    bits = 0
    block = 0
    unbiased = False

    def spec(self) -> str:
        return self.name

    def size(self, n: int) -> int:
        raise NotImplementedError

    def alpha(self, n: int) -> float:
        raise NotImplementedError

    def encode(self, v: torch.Tensor, seed: int) -> list:
        """v: 1-D float32 tensor (any device) -> list of bytes-like parts totalling size(n)."""
        raise NotImplementedError

    def decode(self, mv: memoryview, off: int, n: int, what: str) -> np.ndarray:
        """Read size(n) bytes at off -> writable float32 numpy array of n values (as used)."""
        raise NotImplementedError


class Fp32Codec(_Codec):
    """fp32 values, 4 bytes each: size(n) = 4n.  Exact: alpha = 1."""

    cid, name = 0, "fp32"

    def size(self, n):
        return 4 * n

    def alpha(self, n):
        return 1.0

    def encode(self, v, seed):
        return [_np_cpu(v).view(np.uint8)]

    def decode(self, mv, off, n, what):
        return np.frombuffer(mv, dtype="<f4", count=n, offset=off).copy()


class Bf16Codec(_Codec):
    """bf16 values (round to nearest even), 2 bytes each: size(n) = 2n.

    Relative error <= 2**-8 per entry, so alpha = 1 - 2**-16 (for inputs within bf16's range)."""

    cid, name = 1, "bf16"

    def size(self, n):
        return 2 * n

    def alpha(self, n):
        return 1.0 - 2.0**-16

    def encode(self, v, seed):
        return [_np_cpu(v.to(torch.bfloat16).view(torch.int16)).view(np.uint8)]

    def decode(self, mv, off, n, what):
        u = np.frombuffer(mv, dtype="<u2", count=n, offset=off).astype(np.uint32)
        u <<= np.uint32(16)
        return u.view(np.float32)


class Fp16Codec(_Codec):
    """fp16 values (round to nearest, clamped to +-65504), 2 bytes each: size(n) = 2n.

    Relative error <= 2**-11 in fp16's normal range: alpha = 1 - 2**-22 (inputs with
    6.1e-5 <= |x| <= 65504; outside it the per-entry error is still <= |x|)."""

    cid, name = 2, "fp16"

    def size(self, n):
        return 2 * n

    def alpha(self, n):
        return 1.0 - 2.0**-22

    def encode(self, v, seed):
        return [_np_cpu(v.clamp(-65504.0, 65504.0).to(torch.float16).view(torch.int16)).view(np.uint8)]

    def decode(self, mv, off, n, what):
        return np.frombuffer(mv, dtype="<f2", count=n, offset=off).astype(np.float32)


class NaturalCodec(_Codec):
    """Natural compression: sign + 8-bit exponent = 9 bits per entry.

    Layout: ceil(n/8) bytes of sign bits (little-endian bit order, bit set = negative), then n
    exponent bytes e (0 = zero, 1..254 = 2**(e-127); 255 is invalid).  size(n) = ceil(n/8) + n.
    |x| in [2**a, 2**(a+1)) is rounded stochastically to 2**(a+1) with probability |x|/2**a - 1,
    else to 2**a (subnormals: to 2**-126 or 0): unbiased, omega = 1/8.  ``decode`` returns the
    as-used operator, scaled by 1/(1+omega) = 8/9, which is contractive with alpha = 8/9.
    Randomness: 32-bit uniforms from PCG64(seed).
    """

    cid, name = 3, "natural"
    unbiased = True
    SCALE = 8.0 / 9.0

    def size(self, n):
        return _ceil_div(n, 8) + n

    def alpha(self, n):
        return 8.0 / 9.0

    def encode(self, v, seed):
        # One chunked pass (temporaries stay in cache), same stream as _random_u32(seed, n):
        # code = min(expo + [u >> 9 < mant], 254) with u >> 9 < mant  <=>  u < mant << 9 = bits << 9.
        n = v.numel()
        bits = _np_cpu(v).view(np.uint32)
        bg = _rng(seed).bit_generator
        code = np.empty(n, np.uint8)
        signs = np.empty(_ceil_div(n, 8), np.uint8)
        C = _CHUNK
        thr = np.empty(min(n, C), np.uint32)
        e32 = np.empty(min(n, C), np.uint32)
        cap = np.full(min(n, C), 254, np.uint8)  # np.minimum against an array is SIMD, against a scalar not
        for i in range(0, n, C):
            b = bits[i:i + C]
            m = b.size
            u = bg.random_raw((m + 1) // 2).view(np.uint32)[:m]
            t = np.left_shift(b, np.uint32(9), out=thr[:m])
            up = np.less(u, t)
            e = np.right_shift(b, np.uint32(23), out=e32[:m])
            c = code[i:i + m]
            np.copyto(c, e, casting="unsafe")  # keeps the 8 exponent bits (drops the sign bit)
            np.minimum(c, cap[:m], out=c)  # min(expo + up, 254) == min(min(expo, 254) + up, 254): no wrap
            c += up
            np.minimum(c, cap[:m], out=c)
            signs[i // 8:i // 8 + _ceil_div(m, 8)] = np.packbits(b >= np.uint32(0x80000000), bitorder="little")
        return [signs, code]

    def decode(self, mv, off, n, what):
        nb = _ceil_div(n, 8)
        sbits = np.frombuffer(mv, dtype=np.uint8, count=nb, offset=off)
        codes = np.frombuffer(mv, dtype=np.uint8, count=n, offset=off + nb)
        if n and int(codes.max()) == 255:
            bad = int(np.flatnonzero(codes == 255)[0])
            raise FrameError(f"{what}: natural exponent code 255 (Inf/NaN) at entry {bad}")
        # float bits = sign << 31 | code << 23, then * 8/9; chunked so temporaries stay in cache
        out = np.empty(n, np.uint32)
        C = _CHUNK
        t = np.empty(min(n, C), np.uint32)
        scale = np.float32(self.SCALE)
        for i in range(0, n, C):
            m = min(C, n - i)
            o = out[i:i + m]
            np.copyto(o, codes[i:i + m])
            np.left_shift(o, np.uint32(23), out=o)
            sg = np.unpackbits(sbits[i // 8:i // 8 + _ceil_div(m, 8)], count=m, bitorder="little")
            tm = t[:m]
            np.copyto(tm, sg)
            np.left_shift(tm, np.uint32(31), out=tm)
            np.bitwise_or(o, tm, out=o)
            f = o.view(np.float32)
            np.multiply(f, scale, out=f)
        return out.view(np.float32)


class QuantCodec(_Codec):
    """b-bit quantisation with a per-block fp32 max-abs scale, deterministic nearest rounding.

    Layout: nb = ceil(n/BLOCK) fp32 scales s_j = max|x| over block j, then the n codes
    c = round(x/s * L) + L (L = 2**(b-1) - 1, c in 0..2L) packed b bits each, little-endian bit
    order: size(n) = 4*nb + ceil(n*b/8).  Decoded value (c - L) * s / L.
    Deterministic round-to-nearest (not stochastic), so the operator is biased but contractive
    directly: per entry |err| <= min(|x|, s/(2L)) and the block max is exact, which gives
    ||C(x)-x||^2 <= c/(1+c) ||x||^2 with c = (B-1)/(4L^2), B = min(BLOCK, n):
    alpha = 1/(1+c)  (b=8, B=128: 0.998; b=4: 0.61; b=2: 0.03).
    """

    cid, name = 4, "quant"

    def __init__(self, bits: int, block: int = 128):
        self.bits = bits
        self.block = block
        self.L = (1 << (bits - 1)) - 1

    def spec(self):
        return f"quant:{self.bits}" + ("" if self.block == 128 else f":{self.block}")

    def size(self, n):
        return 4 * _ceil_div(n, self.block) + _ceil_div(n * self.bits, 8)

    def alpha(self, n):
        B = max(1, min(self.block, n))
        c = (B - 1) / (4.0 * self.L**2)
        return 1.0 / (1.0 + c)

    def encode(self, v, seed):
        n = v.numel()
        B = self.block
        nb = _ceil_div(n, B)
        if v.device.type == "cpu":  # numpy, one chunked pass: temporaries stay in cache
            xn = v.numpy()
            full = n // B
            s = np.empty(nb, np.float32)
            codes = np.empty(n, np.uint8 if self.bits <= 8 else np.uint16)
            R = max(1, _CHUNK // B)
            for r0 in range(0, full, R):
                r1 = min(full, r0 + R)
                self._quant_rows(xn[r0 * B:r1 * B].reshape(r1 - r0, B), s[r0:r1], codes[r0 * B:r1 * B])
            if n % B:
                xp = np.zeros((1, B), np.float32)
                xp[0, :n - full * B] = xn[full * B:]
                tail = np.empty(B, codes.dtype)
                self._quant_rows(xp, s[full:], tail)
                codes[full * B:] = tail[:n - full * B]
            if not np.isfinite(s).all():
                raise ValueError("quant codec: input holds NaN or Inf")
            return [s.view(np.uint8), _pack_codes(codes, self.bits)]
        if n % B:
            vp = torch.zeros(nb * B, dtype=torch.float32, device=v.device)
            vp[:n] = v
        else:
            vp = v
        blocks = vp.view(nb, B)
        s = blocks.abs().amax(dim=1) if nb else torch.zeros(0, device=v.device)
        if not bool(torch.isfinite(s).all()):
            raise ValueError("quant codec: input holds NaN or Inf")
        inv = torch.where(s > 0, self.L / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
        q = torch.mul(blocks, inv[:, None]).round_().add_(self.L)  # |x|/s <= 1: no clamp needed
        dt = torch.uint8 if self.bits <= 8 else torch.int32
        codes = _np_cpu(q.reshape(-1)[:n].to(dt))
        return [_np_cpu(s.float()).view(np.uint8), _pack_codes(codes, self.bits)]

    def _quant_rows(self, blocks, s_out, codes_out):
        """Scales and codes of whole blocks (rows), entrywise as the reference formula."""
        with np.errstate(all="ignore"):  # NaN/Inf inputs are rejected by the caller afterwards
            # s = max(max x, -min x) = max |x| (NaN propagates); zero blocks recomputed exactly
            # as the reference so that the sign of a zero scale is the same
            s = s_out
            np.abs(blocks).max(axis=1, out=s)  # numpy only: no torch parallel regions inside the loop
            z = np.flatnonzero(s == 0)
            if z.size:
                s[z] = np.maximum(blocks[z].max(axis=1), -blocks[z].min(axis=1))
            safe = np.where(s > 0, s, np.float32(1))
            inv = np.where(s > 0, np.float32(self.L) / safe, np.float32(0)).astype(np.float32)
            q = blocks * inv[:, None]
            np.rint(q, out=q)
            q += np.float32(self.L)
            np.copyto(codes_out, q.reshape(-1), casting="unsafe")

    def decode(self, mv, off, n, what):
        B = self.block
        nb = _ceil_div(n, B)
        s = np.frombuffer(mv, dtype="<f4", count=nb, offset=off)
        if nb and not (np.isfinite(s).all() and (s >= 0).all()):
            bad = int(np.flatnonzero(~(np.isfinite(s) & (s >= 0)))[0])
            raise FrameError(f"{what}: quant scale {float(s[bad])!r} of block {bad} is not finite and >= 0")
        nbytes = _ceil_div(n * self.bits, 8)
        buf = np.frombuffer(mv, dtype=np.uint8, count=nbytes, offset=off + 4 * nb)
        if self.bits in (2, 4, 8) and n:
            return self._decode_table(buf, s, n, what)
        codes = _unpack_codes(buf, n, self.bits)
        if n and int(codes.max()) > 2 * self.L:
            raise FrameError(f"{what}: quant code {int(codes.max())} out of range 0..{2 * self.L}")
        step = (s / np.float32(self.L)).astype(np.float32)
        codes -= self.L
        vals = codes.astype(np.float32)
        if n % B:
            vp = np.zeros(nb * B, np.float32)
            vp[:n] = vals
            vp = vp.reshape(nb, B)
            vp *= step[:, None]
            return vp.reshape(-1)[:n].copy()
        vals = vals.reshape(nb, B)
        vals *= step[:, None]
        return vals.reshape(-1)

    def _decode_table(self, buf, s, n, what):
        """b in (2, 4, 8): each byte -> its 8/b values (code - L) by a 256-entry table, then * step."""
        b, B, L = self.bits, self.block, self.L
        per = 8 // b
        byte = np.arange(256, dtype=np.int32)[:, None]
        codes_tab = (byte >> (b * np.arange(per, dtype=np.int32))) & ((1 << b) - 1)  # (256, per)
        top = int(np.take(codes_tab.max(axis=1).astype(np.uint8), buf, mode="wrap").max()) if per > 1 else int(buf.max())
        if top > 2 * L:
            # the trailing padding bits are 0, so the maximum over whole bytes is the codes' maximum
            raise FrameError(f"{what}: quant code {top} out of range 0..{2 * L}")
        tab = (codes_tab - L).astype(np.float32)
        step = (s / np.float32(L)).astype(np.float32)
        out = np.empty(buf.size * per, np.float32)
        full = n // B
        # rows of whole blocks, chunked so the gathered values are scaled while in cache
        R = max(1, _CHUNK // B)
        for r0 in range(0, full, R) if B % per == 0 else ():
            r1 = min(full, r0 + R)
            o = out[r0 * B:r1 * B]
            np.take(tab, buf[r0 * B // per:r1 * B // per], axis=0, out=o.reshape(-1, per), mode="wrap")
            o.reshape(r1 - r0, B)[...] *= step[r0:r1, None]
        if B % per == 0:
            if n % B:
                t0 = full * B
                nbt = _ceil_div(n - t0, per)
                o = out[t0:t0 + nbt * per]
                np.take(tab, buf[t0 // per:t0 // per + nbt], axis=0, out=o.reshape(-1, per), mode="wrap")
                o *= step[full]
            return out[:n]
        np.take(tab, buf, axis=0, out=out.reshape(-1, per), mode="wrap")
        nb = step.size
        if n % B:
            vp = np.zeros(nb * B, np.float32)
            vp[:n] = out[:n]
            vp = vp.reshape(nb, B)
            vp *= step[:, None]
            return vp.reshape(-1)[:n].copy()
        vals = out[:n].reshape(nb, B)
        vals *= step[:, None]
        return vals.reshape(-1)


class SignCodec(_Codec):
    """Scaled sign: value s_j * sign(x) with s_j = mean|x| over block j (BLOCK 0 = whole vector).

    Layout: nb fp32 scales (nb = 1 for a whole non-empty vector, ceil(n/BLOCK) with blocks), then n
    sign bits (bit set = negative, little-endian bit order): size(n) = 4*nb + ceil(n/8).
    ||C(x)-x||^2 = ||x||^2 - sum_j ||x_j||_1^2/B_j, so alpha = ||x||_1^2/(B||x||^2) >= 1/B with
    B = block length (n for the whole vector); ``alpha`` reports the worst case 1/B.
    """

    cid, name = 5, "sign"

    def __init__(self, block: int = 0):
        self.block = block

    def spec(self):
        return "sign" + (f":{self.block}" if self.block else "")

    def _nb(self, n):
        if n == 0:
            return 0
        return 1 if self.block == 0 else _ceil_div(n, self.block)

    def size(self, n):
        return 4 * self._nb(n) + _ceil_div(n, 8)

    def alpha(self, n):
        B = n if self.block == 0 else min(self.block, n)
        return 1.0 / max(1, B)

    def encode(self, v, seed):
        n = v.numel()
        nb = self._nb(n)
        if v.device.type == "cpu" and n:
            return self._encode_cpu(v, n, nb)
        if self.block == 0 or nb <= 1:
            s = v.abs().mean().reshape(1) if n else torch.zeros(0, device=v.device)
        else:
            B = self.block
            vp = torch.zeros(nb * B, dtype=torch.float32, device=v.device)
            vp[:n] = v.abs()
            cnt = torch.full((nb,), float(B), device=v.device)
            cnt[-1] = n - (nb - 1) * B
            s = vp.view(nb, B).sum(dim=1) / cnt
        if not bool(torch.isfinite(s).all()):
            raise ValueError("sign codec: input holds NaN or Inf")
        signs = np.packbits(_np_cpu(v < 0), bitorder="little")
        return [_np_cpu(s.float()).view(np.uint8), signs]

    def _encode_cpu(self, v, n, nb):
        # |x| and the sign bits in one chunked pass; the scales are then the very same torch
        # reductions as on other devices, over a numpy (huge-page) buffer instead of a fresh tensor.
        xn = v.numpy()
        B = self.block
        whole = self.block == 0 or nb <= 1
        ab = np.empty(n if whole else nb * B, np.float32)
        signs = np.empty(_ceil_div(n, 8), np.uint8)
        C = _CHUNK
        for i in range(0, n, C):
            ch = xn[i:i + C]
            np.abs(ch, out=ab[i:i + ch.size])
            signs[i // 8:i // 8 + _ceil_div(ch.size, 8)] = np.packbits(ch < 0, bitorder="little")
        at = torch.from_numpy(ab)
        if whole:
            s = at.mean().reshape(1)
        else:
            ab[n:] = 0
            cnt = torch.full((nb,), float(B))
            cnt[-1] = n - (nb - 1) * B
            s = at.view(nb, B).sum(dim=1) / cnt
        if not bool(torch.isfinite(s).all()):
            raise ValueError("sign codec: input holds NaN or Inf")
        return [s.numpy().view(np.uint8), signs]

    def decode(self, mv, off, n, what):
        nb = self._nb(n)
        s = np.frombuffer(mv, dtype="<f4", count=nb, offset=off)
        if nb and not (np.isfinite(s).all() and (s >= 0).all()):
            bad = int(np.flatnonzero(~(np.isfinite(s) & (s >= 0)))[0])
            raise FrameError(f"{what}: sign scale {float(s[bad])!r} of block {bad} is not finite and >= 0")
        bits = np.frombuffer(mv, dtype=np.uint8, count=_ceil_div(n, 8), offset=off + 4 * nb)
        if nb == 1 or (nb > 1 and self.block % 8 == 0):
            # byte -> its 8 values by table: +-s (s | sign bit, as below); blocks: +-1 then * s_j
            tab = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
            tab = tab.astype(np.uint32) << np.uint32(31)
            if nb == 1:
                tab |= s.view(np.uint32)[0]
                out = np.empty((bits.size, 8), np.float32)
                C = _CHUNK // 8
                for i in range(0, bits.size, C):
                    np.take(tab.view(np.float32), bits[i:i + C], axis=0, out=out[i:i + C], mode="wrap")
                return out.reshape(-1)[:n]
            tab |= np.float32(1).view(np.uint32)
            out = np.take(tab.view(np.float32), bits, axis=0, mode="wrap").reshape(-1)
            B = self.block
            full = n // B
            if full:
                o = out[: full * B].reshape(full, B)
                o *= s[:full, None]
            if n % B:
                out[full * B:n] *= s[full]
            return out[:n]
        neg = np.unpackbits(bits, count=n, bitorder="little").astype(np.uint32)
        neg <<= np.uint32(31)
        if nb <= 1:
            neg |= s.view(np.uint32)[0] if nb else np.uint32(0)
        else:
            neg |= np.repeat(s.view(np.uint32), self.block)[:n]
        return neg.view(np.float32)


# ----------------------------------------------------------------------------------------------
# compressors (structures)


class Compressor:
    """A structure + value codec.  See the module docstring and the subclasses for frame layouts."""

    sid = 0
    struct_name = "identity"

    def __init__(self, codec: _Codec, spec: str):
        self.codec = codec
        self.spec = spec
        self.contractive = True

    def __repr__(self):
        return f"<Compressor {self.spec}>"

    def __eq__(self, other):
        return isinstance(other, Compressor) and other.spec == self.spec

    def __hash__(self):
        return hash(self.spec)

    @property
    def unbiased(self) -> bool:
        return self.codec.unbiased

    # -- interface ----------------------------------------------------------------------------
    def alpha(self, shape) -> float:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, seed: int = 0) -> bytes:
        raise NotImplementedError

    def decode(self, frame, shape, device="cpu") -> torch.Tensor:
        raise NotImplementedError

    def frame_size(self, shape, nnz_layout=None) -> int:
        raise NotImplementedError

    def frame_layout(self, frame):
        """Data-dependent part of the frame size (topk: (index layout, index bytes)); else None."""
        return None

    # -- shared ---------------------------------------------------------------------------------
    def _header(self, numel: int) -> bytes:
        c = self.codec
        return _HEADER.pack(MAGIC, VERSION, self.sid, c.cid, c.bits, c.block, numel)

    def _check_header(self, mv: memoryview, shape) -> int:
        what = f"{self.struct_name} frame"
        numel = _numel(shape)
        if len(mv) < HEADER_SIZE:
            raise FrameError(f"{what}: truncated, {len(mv)} bytes but the header alone needs {HEADER_SIZE}")
        magic, ver, sid, cid, bits, block, n = _HEADER.unpack_from(mv, 0)
        if magic != MAGIC:
            raise FrameError(f"{what}: bad magic {bytes(magic)!r} (expected {MAGIC!r}); not an efmuon frame")
        if ver != VERSION:
            raise FrameError(f"{what}: unsupported frame version {ver} (this build reads {VERSION})")
        c = self.codec
        if (sid, cid, bits, block) != (self.sid, c.cid, c.bits, c.block):
            sname = _STRUCT_NAMES.get(sid, f"<unknown structure id {sid}>")
            cname = _CODEC_NAMES.get(cid, f"<unknown codec id {cid}>")
            raise FrameError(
                f"codec mismatch: frame is structure {sname} with value codec {cname} "
                f"(bits={bits}, block={block}) but this compressor is {self.spec!r}"
            )
        if n != numel:
            raise FrameError(f"{what}: header says {n} entries but shape {tuple(shape)} has {numel}")
        return numel

    @staticmethod
    def _check_len(what: str, mv: memoryview, expected: int):
        got = len(mv)
        if got < expected:
            raise FrameError(f"{what}: truncated, {got} bytes but the layout needs exactly {expected}")
        if got > expected:
            raise FrameError(f"{what}: extended, {got} bytes but the layout needs exactly {expected} "
                             f"({got - expected} extra)")

    @staticmethod
    def _out(vals: np.ndarray, shape, device) -> torch.Tensor:
        t = torch.from_numpy(vals).reshape(_as_shape(shape))
        if str(device) != "cpu":
            t = t.to(device)
        return t


class Identity(Compressor):
    """All entries through the value codec.

    Frame: header (18) + codec(numel).  Length = 18 + size_codec(numel) where size_codec is
    fp32 4n, bf16/fp16 2n, natural ceil(n/8)+n, quant 4*ceil(n/BLOCK)+ceil(n*b/8),
    sign 4*nb+ceil(n/8).  alpha = alpha_codec(numel)."""

    sid, struct_name = 0, "identity"

    def alpha(self, shape):
        return self.codec.alpha(_numel(_as_shape(shape)))

    def frame_size(self, shape, nnz_layout=None):
        return HEADER_SIZE + self.codec.size(_numel(_as_shape(shape)))

    def encode(self, x, seed=0):
        v = _flat_f32(x)
        parts = [self._header(v.numel())] + self.codec.encode(v, _subseed(seed, 1))
        return b"".join(parts)

    def decode(self, frame, shape, device="cpu"):
        mv = _mv(frame)
        n = self._check_header(mv, shape)
        self._check_len("identity frame", mv, HEADER_SIZE + self.codec.size(n))
        return self._out(self.codec.decode(mv, HEADER_SIZE, n, "identity frame"), shape, device)


_IDX_ABS, _IDX_VARINT, _IDX_BITMAP = 0, 1, 2
_LAYOUT_NAMES = {_IDX_ABS: "int32", _IDX_VARINT: "varint", _IDX_BITMAP: "bitmap"}


def _k_of(arg, d: int) -> int:
    if d == 0:
        return 0
    if isinstance(arg, int):
        return min(arg, d)
    return max(1, min(d, int(math.ceil(arg * d - 1e-9))))


class TopK(Compressor):
    """The k largest |x| (ties: lower index first), values exact through the codec, zeros elsewhere.

    Frame: header (18) + u64 k + u8 index layout + codec(k values, in increasing index order)
    + index section, one of (chosen per frame, cheapest; ties prefer int32, then varint):
      0 "int32":  k absolute indices, uint32 (uint64 if numel > 2**32): 4k (8k) bytes;
      1 "varint": k LEB128 gaps g0 = i0, g_j = i_j - i_{j-1} - 1: sum of varint lengths bytes;
      2 "bitmap": numel bits, bit i set iff index i is kept, little-endian bit order: ceil(numel/8).
    Length = 27 + size_codec(k) + index_bytes.  ``frame_size(shape, nnz_layout)`` takes nnz_layout
    = ("int32"|"bitmap"|"varint", index_bytes) (as from ``frame_layout(frame)``), or a layout name
    ("int32"/"bitmap"), or None = the bound min(int32, bitmap) which every frame respects.
    k = ceil(F*numel) (at least 1) for a fraction F, min(K, numel) for an integer K.
    alpha = (k/numel) * alpha_codec(k) (deterministically: the kept part holds >= k/d of ||x||^2).
    """

    sid, struct_name = 1, "topk"
    FIXED = HEADER_SIZE + 9

    def __init__(self, codec, spec, arg):
        super().__init__(codec, spec)
        self.arg = arg

    def k(self, shape) -> int:
        return _k_of(self.arg, _numel(_as_shape(shape)))

    def alpha(self, shape):
        d = _numel(_as_shape(shape))
        if d == 0:
            return 1.0
        k = self.k(shape)
        return (k / d) * self.codec.alpha(k)

    def _abs_width(self, d):
        return 4 if d <= (1 << 32) else 8

    def frame_size(self, shape, nnz_layout=None):
        d = _numel(_as_shape(shape))
        k = self.k(shape)
        base = self.FIXED + self.codec.size(k)
        abs_b, bmp_b = self._abs_width(d) * k, _ceil_div(d, 8)
        if nnz_layout is None:
            return base + min(abs_b, bmp_b)
        if isinstance(nnz_layout, str):
            name, nbytes = nnz_layout, None
        else:
            name, nbytes = nnz_layout
        if name == "int32":
            return base + abs_b
        if name == "bitmap":
            return base + bmp_b
        if name == "varint":
            if nbytes is None:
                raise ValueError("topk frame_size: the varint layout needs ('varint', index_bytes)")
            return base + int(nbytes)
        raise ValueError(f"topk frame_size: unknown index layout {name!r} (int32, varint, bitmap)")

    def frame_layout(self, frame):
        mv = _mv(frame)
        if len(mv) < self.FIXED:
            raise FrameError(f"topk frame: truncated, {len(mv)} bytes but the fixed part needs {self.FIXED}")
        k = _U64.unpack_from(mv, HEADER_SIZE)[0]
        lay = mv[HEADER_SIZE + 8]
        if lay not in _LAYOUT_NAMES:
            raise FrameError(f"topk frame: unknown index layout {lay}")
        return (_LAYOUT_NAMES[lay], len(mv) - self.FIXED - self.codec.size(k))

    def encode(self, x, seed=0):
        v = _flat_f32(x)
        d = v.numel()
        k = _k_of(self.arg, d)
        if v.device.type == "cpu":
            xn = v.numpy()
            idx = _select_largest_np(xn, k, use_abs=True)
            vals = torch.from_numpy(xn[idx])
        else:
            idx_t = _select_largest(v.abs(), k)
            vals = v[idx_t]
            idx = _np_cpu(idx_t).astype(np.int64, copy=False)
        w = self._abs_width(d)
        abs_b, bmp_b = w * k, _ceil_div(d, 8)
        # varint only when it can win: its size is >= k bytes
        g = sizes = None
        var_b = None
        if k < min(abs_b, bmp_b):
            g = _gaps(idx)
            sizes = _varint_sizes(g)
            var_b = int(sizes.sum())
        best = min(abs_b, bmp_b, var_b if var_b is not None else abs_b + bmp_b + 1)
        if best == abs_b:
            lay, isec = _IDX_ABS, idx.astype("<u4" if w == 4 else "<u8").view(np.uint8)
        elif var_b is not None and best == var_b:
            lay, isec = _IDX_VARINT, _varint_encode(g, sizes)
        else:
            mask = np.zeros(d, bool)
            mask[idx] = True
            lay, isec = _IDX_BITMAP, np.packbits(mask, bitorder="little")
        parts = [self._header(d), _U64.pack(k), bytes([lay])]
        parts += self.codec.encode(vals, _subseed(seed, 2))
        parts.append(isec)
        return b"".join(parts)

    def decode(self, frame, shape, device="cpu"):
        mv = _mv(frame)
        d = self._check_header(mv, shape)
        what = "topk frame"
        if len(mv) < self.FIXED:
            raise FrameError(f"{what}: truncated, {len(mv)} bytes but the fixed part needs {self.FIXED}")
        k = _U64.unpack_from(mv, HEADER_SIZE)[0]
        lay = mv[HEADER_SIZE + 8]
        if k > d:
            raise FrameError(f"{what}: k = {k} exceeds the {d} entries of shape {tuple(shape)}")
        if lay not in _LAYOUT_NAMES:
            raise FrameError(f"{what}: unknown index layout {lay} (0 int32, 1 varint, 2 bitmap)")
        voff = self.FIXED
        ioff = voff + self.codec.size(k)
        w = self._abs_width(d)
        if lay == _IDX_ABS:
            self._check_len(what, mv, ioff + w * k)
            idx = np.frombuffer(mv, dtype="<u4" if w == 4 else "<u8", count=k, offset=ioff).astype(np.int64)
        elif lay == _IDX_BITMAP:
            nb = _ceil_div(d, 8)
            self._check_len(what, mv, ioff + nb)
            bm = np.frombuffer(mv, dtype=np.uint8, count=nb, offset=ioff)
            bits = np.unpackbits(bm, bitorder="little")
            if bits[d:].any():
                raise FrameError(f"{what}: bitmap has bits set past entry {d}")
            idx = np.flatnonzero(bits)
            if idx.size != k:
                raise FrameError(f"{what}: bitmap marks {idx.size} entries but k = {k}")
        else:
            rest = len(mv) - ioff
            if rest < k:
                raise FrameError(f"{what}: truncated, {rest} index bytes cannot hold {k} varints")
            if rest > 10 * k:
                raise FrameError(f"{what}: extended, {rest} index bytes for {k} varints (max {10 * k})")
            g = _varint_decode(np.frombuffer(mv, dtype=np.uint8, count=rest, offset=ioff), k, what)
            if k and int(g.max()) >= d:
                raise FrameError(f"{what}: index gap {int(g.max())} out of range for {d} entries")
            idx = np.cumsum(g.astype(np.int64) + 1) - 1
        if k:
            # varint indices (gaps < d) are strictly increasing unless the int64 cumsum overflowed
            if lay == _IDX_ABS or (lay == _IDX_VARINT and k > 1 and k * d >= (1 << 62)):
                dif = np.diff(idx)
                if (dif <= 0).any():
                    p = int(np.flatnonzero(dif <= 0)[0]) + 1
                    raise FrameError(f"{what}: indices not strictly increasing at position {p} "
                                     f"({int(idx[p])} after {int(idx[p - 1])})")
            if int(idx[-1]) >= d:
                bad = int(idx[idx >= d][0])
                raise FrameError(f"{what}: index {bad} out of range for {d} entries")
        vals = self.codec.decode(mv, voff, k, what)
        out = np.zeros(d, np.float32)
        out[idx] = vals
        return self._out(out, shape, device)


class RandK(Compressor):
    """k entries drawn uniformly without replacement from a generator seeded by ``seed``.

    Frame: header (18) + u64 k + u64 seed + codec(k values, in draw order).  No indices: decode
    regenerates them from the seed (k largest of numel PCG64(seed) uint32 keys, ties by lower
    index).  Length = 34 + size_codec(k).
    Raw (d/k)*mask is unbiased (omega = d/k - 1); as used it is scaled by k/d (plain mask):
    E||C(x)-x||^2 = (1 - k/d)||x||^2, alpha = (k/d) * alpha_codec(k).
    """

    sid, struct_name = 2, "randk"
    FIXED = HEADER_SIZE + 16

    def __init__(self, codec, spec, arg):
        super().__init__(codec, spec)
        self.arg = arg

    @property
    def unbiased(self):
        return True

    def k(self, shape):
        return _k_of(self.arg, _numel(_as_shape(shape)))

    def alpha(self, shape):
        d = _numel(_as_shape(shape))
        if d == 0:
            return 1.0
        k = self.k(shape)
        return (k / d) * self.codec.alpha(k)

    def frame_size(self, shape, nnz_layout=None):
        return self.FIXED + self.codec.size(self.k(shape))

    @staticmethod
    def indices(d: int, k: int, seed: int) -> torch.Tensor:
        if k >= d:
            return torch.arange(d)
        return torch.from_numpy(_select_largest_np(_random_u32(seed, d), k, use_abs=False))

    def encode(self, x, seed=0):
        v = _flat_f32(x)
        d = v.numel()
        k = _k_of(self.arg, d)
        s = int(seed) & _MASK64
        idx = self.indices(d, k, s).to(v.device)
        vals = v[idx]
        parts = [self._header(d), _U64.pack(k), _U64.pack(s)] + self.codec.encode(vals, _subseed(s, 3))
        return b"".join(parts)

    def decode(self, frame, shape, device="cpu"):
        mv = _mv(frame)
        d = self._check_header(mv, shape)
        what = "randk frame"
        if len(mv) < self.FIXED:
            raise FrameError(f"{what}: truncated, {len(mv)} bytes but the fixed part needs {self.FIXED}")
        k, s = struct.unpack_from("<QQ", mv, HEADER_SIZE)
        if k > d:
            raise FrameError(f"{what}: k = {k} exceeds the {d} entries of shape {tuple(shape)}")
        self._check_len(what, mv, self.FIXED + self.codec.size(k))
        vals = self.codec.decode(mv, self.FIXED, k, what)
        idx = self.indices(d, k, s).numpy()
        out = np.zeros(d, np.float32)
        out[idx] = vals
        return self._out(out, shape, device)


class RankK(Compressor):
    """Rank-r approximation C(x) = P Q^T of x viewed as m x n (m = shape[0], n = numel/m).

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

    def _geom(self, shape):
        shape = _as_shape(shape)
        d = _numel(shape)
        if len(shape) < 2 or d == 0:
            return d, 0, 0, 0
        m = shape[0]
        n = d // m
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
        return self.FIXED + self.codec.size(m * r) + self.codec.size(n * r)

    def encode(self, x, seed=0):
        v = _flat_f32(x)
        d, m, n, r = self._geom(x.shape)
        if r == 0:
            parts = [self._header(d), _U32.pack(0)] + self.codec.encode(v, _subseed(seed, 4))
            return b"".join(parts)
        X = v.reshape(m, n)
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
        parts = [self._header(d), _U32.pack(r)]
        parts += self.codec.encode(Pf.contiguous().reshape(-1), _subseed(seed, 6))
        parts += self.codec.encode(Qf.contiguous().reshape(-1), _subseed(seed, 7))
        return b"".join(parts)

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
        if len(shape) < 2 or d == 0:
            raise FrameError(f"{what}: rank {r} factors for shape {shape}, which is not a matrix")
        m = shape[0]
        n = d // m
        if r > min(m, n):
            raise FrameError(f"{what}: rank {r} exceeds min(m, n) = {min(m, n)} for a {m} x {n} matrix")
        sp = self.codec.size(m * r)
        self._check_len(what, mv, self.FIXED + sp + self.codec.size(n * r))
        P = self.codec.decode(mv, self.FIXED, m * r, what).reshape(m, r)
        Q = self.codec.decode(mv, self.FIXED + sp, n * r, what).reshape(n, r)
        out = torch.from_numpy(np.ascontiguousarray(P @ Q.T, dtype=np.float32)).reshape(shape)
        return out if str(device) == "cpu" else out.to(device)


# ----------------------------------------------------------------------------------------------
# spec parsing

_INT_RE = re.compile(r"^[0-9]+$")


def _bad(spec, what):
    return ConfigError(f"invalid compressor spec {spec!r}: {what}. Valid forms: {VALID_FORMS}")


def _parse_count(spec, name, arg):
    if arg is None or arg == "":
        raise _bad(spec, f"{name} needs an argument, a fraction in (0, 1] or an integer k >= 1")
    if _INT_RE.match(arg):
        k = int(arg)
        if k < 1:
            raise _bad(spec, f"{name}:{arg}: k must be >= 1")
        return k, str(k)
    try:
        f = float(arg)
    except ValueError:
        raise _bad(spec, f"{name}:{arg}: argument is neither a fraction in (0, 1] nor an integer k >= 1") from None
    if not (0.0 < f <= 1.0) or not math.isfinite(f):
        raise _bad(spec, f"{name}:{arg}: fraction must be in (0, 1]")
    return f, repr(f)


def _parse_int(spec, what, arg, lo, hi=None):
    if arg is None or not _INT_RE.match(arg):
        raise _bad(spec, f"{what} must be an integer, got {arg!r}")
    v = int(arg)
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise _bad(spec, f"{what} must be in {rng}, got {v}")
    return v


def _parse_codec(spec, tok) -> _Codec | None:
    """Codec from a token, or None when the token is not a codec name."""
    name, _, rest = tok.partition(":")
    args = rest.split(":") if rest else []
    if name in ("fp32", "bf16", "fp16", "natural"):
        if args:
            raise _bad(spec, f"{name} takes no argument")
        return {"fp32": Fp32Codec, "bf16": Bf16Codec, "fp16": Fp16Codec, "natural": NaturalCodec}[name]()
    if name == "quant":
        if not args or len(args) > 2:
            raise _bad(spec, "quant needs quant:BITS or quant:BITS:BLOCK")
        bits = _parse_int(spec, "quant bits", args[0], 2, 16)
        block = _parse_int(spec, "quant block", args[1], 1, 1 << 31) if len(args) == 2 else 128
        return QuantCodec(bits, block)
    if name == "sign":
        if len(args) > 1:
            raise _bad(spec, "sign takes at most a block length, sign:BLOCK")
        block = _parse_int(spec, "sign block", args[0], 1, 1 << 31) if args else 0
        return SignCodec(block)
    return None


def parse_spec(spec: str) -> Compressor:
    """Parse a compressor spec (see module docstring); raises ConfigError listing valid forms."""
    if not isinstance(spec, str):
        raise ConfigError(f"compressor spec must be a string, got {type(spec).__name__}. Valid forms: {VALID_FORMS}")
    s = spec.strip().lower()
    if not s:
        raise _bad(spec, "empty spec")
    parts = s.split("+")
    if any(p == "" for p in parts):
        raise _bad(spec, "empty part around '+'")
    if len(parts) > 2:
        raise _bad(spec, "at most one '+': a structure then a value codec")
    head = parts[0]
    codec_tok = parts[1] if len(parts) == 2 else None
    name, _, rest = head.partition(":")

    if name not in ("identity", "topk", "randk", "rankk"):
        c = _parse_codec(spec, head)
        if c is None:
            raise _bad(spec, f"unknown compressor {name!r}")
        if codec_tok is not None:
            raise _bad(spec, f"{head!r} is a value codec; the structure must come first (e.g. topk:0.1+{head})")
        return Identity(c, _canon("identity", None, c))

    codec: _Codec = Fp32Codec()
    if codec_tok is not None:
        c = _parse_codec(spec, codec_tok)
        if c is None:
            cname = codec_tok.partition(":")[0]
            if cname in _STRUCT_IDS:
                raise _bad(spec, f"{codec_tok!r} is a structure; only one structure, first, then a value codec")
            raise _bad(spec, f"unknown value codec {codec_tok!r}")
        codec = c

    if name == "identity":
        if rest:
            c = _parse_codec(spec, rest)
            if c is None or c.cid not in (0, 1, 2):
                raise _bad(spec, f"identity:{rest}: only identity, identity:bf16, identity:fp16")
            if codec_tok is not None:
                raise _bad(spec, "identity:TYPE cannot also take '+CODEC'")
            codec = c
        return Identity(codec, _canon("identity", None, codec))
    if name in ("topk", "randk"):
        arg, canon = _parse_count(spec, name, rest if rest else None)
        cls = TopK if name == "topk" else RandK
        return cls(codec, _canon(name, canon, codec), arg)
    # rankk
    if not rest:
        raise _bad(spec, "rankk needs a rank, rankk:R with R >= 1")
    r = _parse_int(spec, "rankk rank", rest, 1)
    if codec.cid not in (0, 1, 2):
        raise _bad(spec, f"rankk composes only with fp32, bf16 or fp16 (got {codec.spec()})")
    return RankK(codec, _canon("rankk", str(r), codec), r)


def _canon(struct_name, arg, codec: _Codec) -> str:
    if struct_name == "identity":
        if codec.cid == 0:
            return "identity"
        if codec.cid in (1, 2):
            return f"identity:{codec.name}"
        return codec.spec()
    head = f"{struct_name}:{arg}"
    return head if codec.cid == 0 else f"{head}+{codec.spec()}"


def encode_decode(comp: Compressor, x: torch.Tensor, seed: int = 0):
    """(frame, xhat): encode x and decode it back on x's device."""
    frame = comp.encode(x, seed)
    return frame, comp.decode(frame, tuple(x.shape), device=x.device)

"""Compressors of EF21-Muon: tensors <-> exact, self-describing byte frames.

Public API::

    comp = parse_spec("topk:0.05+natural")
    frame = comp.encode(x, seed)              # bytes, deterministic given (x, seed)
    xhat = comp.decode(frame, x.shape)        # float32 tensor of that shape
    len(frame) == comp.frame_size(x.shape, comp.frame_layout(frame))
    comp.alpha(x.shape)                       # E||C(x)-x||^2 <= (1-alpha)||x||^2 for C as used

A compressor is a *structure* (which entries / which subspace is sent) followed by a *value codec*
(how the sent numbers are written).

Structures (this module): ``identity`` (all entries), ``topk:F|K`` (k largest |x|), ``randk:F|K``
(k entries drawn from ``seed``; the frame carries the seed and no indices), ``rankk:R`` (rank-R
factors P Q^T).  Value codecs (``efmuon.common.codecs``, which documents their byte layouts):
``fp32`` (default, omitted from spellings), ``bf16``, ``fp16``, ``natural`` (sign + 8-bit exponent,
stochastic rounding to a power of two), ``quant:B[:BLOCK]`` (B bits, per-block fp32 max-abs scale,
deterministic round-to-nearest), ``sign[:BLOCK]`` (scaled sign, 1 bit/entry).

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
* natural: raw stochastic power-of-two rounding is unbiased with omega = 1/8 (both up to 2**-16
  relative: 16 random bits per entry, see ``NaturalCodec``); ``decode`` returns it scaled by 8/9:
  alpha = 8/9.
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
bit generators (randk: PCG64, natural: SFC64) seeded from it, and only their ``random_raw`` streams,
which numpy keeps stable: frames decode identically on any machine.
"""

from __future__ import annotations

import math
import re
import struct
import sys

import numpy as np
import torch

from .codecs import (  # the value codecs and the bit / varint helpers live in codecs.py
    _CHUNK,
    Bf16Codec,
    Fp16Codec,
    Fp32Codec,
    NaturalCodec,
    QuantCodec,
    SignCodec,
    _ceil_div,
    _Codec,
    _gaps,
    _np_cpu,
    _varint_decode,
    _varint_encode,
    _varint_sizes,
)
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


def _mv(frame) -> memoryview:
    try:
        mv = memoryview(frame)
    except TypeError as e:
        raise FrameError(f"frame must be bytes-like, got {type(frame).__name__}") from e
    if mv.ndim != 1 or mv.itemsize != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    return mv


def _qr(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal factor of a reduced QR.  On CPU via numpy's LAPACK, which for the thin matrices
    used here is ~100x faster than torch.linalg.qr under thread contention."""
    if isinstance(a, np.ndarray):
        return np.linalg.qr(a, mode="reduced")[0].astype(np.float32, copy=False)
    return torch.linalg.qr(a).Q


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

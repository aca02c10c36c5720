"""The sparse structures: ``topk:F|K`` (the k largest |x|, with the cheapest of three index
layouts per frame) and ``randk:F|K`` (k entries drawn from the seed; the frame carries the seed and
no indices)."""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from ..errors import FrameError
from .base import _U64, HEADER_SIZE, Compressor, _as_shape, _flat_f32, _mv, _numel
from .bits import _ceil_div, _gaps, _np_cpu, _varint_decode, _varint_encode, _varint_sizes
from .seeds import _MASK64, _random_u32, _subseed
from .selection import _select_largest, _select_largest_np


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


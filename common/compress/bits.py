"""Byte-level building blocks of the frames: chunk sizes of the single-pass numpy loops, the bit
packing of b-bit codes (quant), and the LEB128 delta varints of topk's index section.

Everything here is vectorized numpy and knows nothing of compressors or headers; the CPU paths of
the codecs and structures run as chunked passes (temporaries stay in cache) sized by the constants
below.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FrameError

_CHUNK = 1 << 16  # elements per chunk of the fused single-pass loops (fits L2 with its temporaries)
# elements per chunk of the value codecs' loops (natural, quant): ~10 numpy calls per chunk, so
# larger chunks (working set ~3 MB, in L3) beat L2-sized ones by cutting the per-call overhead
_VCHUNK = 1 << 18


def _np_cpu(t: torch.Tensor) -> np.ndarray:
    return t.to("cpu").contiguous().numpy()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


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
    if b < 8:
        return _pack_groups(codes, b)
    return _pack_bitwise(codes, b)


def _pack_bitwise(codes: np.ndarray, b: int) -> np.ndarray:
    """The bit-by-bit form of _pack_codes (any b): one uint8 per bit, then np.packbits."""
    bits = ((codes.astype(np.uint32)[:, None] >> np.arange(b, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def _pack_groups(codes: np.ndarray, b: int) -> np.ndarray:
    """_pack_codes for b < 8 not dividing 8 (3, 5, 6, 7): 8 codes fill exactly b bytes, so each group
    of 8 is one little-endian uint64 built by 8 shifts and ORs, of which the low b bytes are kept.
    The same bytes as _pack_bitwise, in ~n/8-element passes instead of n*b-element ones."""
    n = codes.size
    groups = _ceil_div(n, 8)
    c = np.zeros(groups * 8, np.uint64)
    c[:n] = codes
    c = c.reshape(groups, 8)
    v = c[:, 0].copy()
    for j in range(1, 8):
        c[:, j] <<= np.uint64(b * j)
        v |= c[:, j]
    return v.view(np.uint8).reshape(groups, 8)[:, :b].reshape(-1)[:_ceil_div(n * b, 8)].copy()


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
    if b < 8:
        return _unpack_groups(buf, n, b)
    return _unpack_bitwise(buf, n, b)


def _unpack_bitwise(buf: np.ndarray, n: int, b: int) -> np.ndarray:
    """The bit-by-bit form of _unpack_codes (any b)."""
    bits = np.unpackbits(buf, count=n * b, bitorder="little").reshape(n, b).astype(np.int32)
    return (bits << np.arange(b, dtype=np.int32)).sum(axis=1, dtype=np.int32)


def _unpack_groups(buf: np.ndarray, n: int, b: int) -> np.ndarray:
    """Inverse of _pack_groups: each b bytes, zero-extended to a little-endian uint64, hold 8 codes."""
    groups = _ceil_div(n, 8)
    g = np.zeros((groups, 8), np.uint8)
    nbytes = _ceil_div(n * b, 8)
    flat = np.zeros(groups * b, np.uint8)
    flat[:nbytes] = buf[:nbytes]
    g[:, :b] = flat.reshape(groups, b)
    v = g.view("<u8").reshape(groups)
    m = np.uint64((1 << b) - 1)
    out = np.empty((groups, 8), np.int32)
    t = np.empty(groups, np.uint64)
    for j in range(8):
        np.right_shift(v, np.uint64(b * j), out=t)
        t &= m
        out[:, j] = t
    return out.reshape(-1)[:n]

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


"""Value codecs of the compressors: how the numbers a structure sends are written as bytes.

A value codec writes n fp32 values into a byte section of exactly ``size(n)`` bytes and reads them
back (``decode`` returns the values *as used*, e.g. natural's 8/9 scaling); it knows nothing of the
frame header or of which entries are sent (``efmuon.common.compress`` holds the structures, the
header and ``parse_spec``).  Codecs: ``fp32``, ``bf16``, ``fp16``, ``natural`` (sign + 8-bit
exponent, stochastic rounding), ``quant:B[:BLOCK]`` (B bits, per-block max-abs scale), ``sign[:BLOCK]``
(scaled sign).  Each class documents its byte layout and its contraction / unbiasedness claims.

Also here: the bit packing of b-bit codes and the LEB128 delta varints of topk's index section, both
vectorized with numpy.  The CPU paths run as chunked numpy passes (temporaries stay in cache) that
write straight into the output buffers.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from .errors import FrameError

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("efmuon.common.codecs assumes a little-endian host")

_MASK64 = (1 << 64) - 1

_CHUNK = 1 << 16  # elements per chunk of the fused single-pass loops (fits L2 with its temporaries)
# elements per chunk of the value codecs' loops (natural, quant): ~10 numpy calls per chunk, so
# larger chunks (working set ~3 MB, in L3) beat L2-sized ones by cutting the per-call overhead
_VCHUNK = 1 << 18


def _np_cpu(t: torch.Tensor) -> np.ndarray:
    return t.to("cpu").contiguous().numpy()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _natural_words(seed: int):
    """The bit generator of NaturalCodec's rounding words (a function of its own so that a test can
    substitute one that yields every 16-bit word and check the rounding's exact expectation)."""
    return np.random.SFC64(int(seed) & _MASK64)


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

class _QuantWork:
    """Scratch buffers for one chunk of ``rows`` blocks of ``B`` entries, reused chunk after chunk."""

    def __init__(self, rows: int, B: int):
        m = rows * B
        self.u32 = np.empty(m, np.uint32)
        self.inv = np.empty(rows, np.float32)
        self.starts = np.arange(0, m, B)
        self.c8 = np.empty(m, np.uint8)
        self.t16 = np.empty(m // 2, np.uint16)
        self.t32 = np.empty(m // 4, np.uint32)
        self.t32b = np.empty(m // 4, np.uint32)


def _pack_chunk(q: np.ndarray, b: int, dst: np.ndarray, work: _QuantWork) -> None:
    """Pack the codes held in the low b bits of uint32 ``q`` into the bytes ``dst``, as
    _pack_codes does (b in 2, 4, 8, 16; len(q) a multiple of 8 // b).  2 and 4 bits: the 8/b codes
    of each output byte are gathered by shifts and ORs on a uint32 / uint16 view of their bytes."""
    if b == 16:
        np.copyto(dst.view("<u2"), q, casting="unsafe")
        return
    if b == 8:
        np.copyto(dst, q, casting="unsafe")
        return
    m = q.size
    c = work.c8[:m]
    np.copyto(c, q, casting="unsafe")
    if b == 4:  # uint16 c0 | c1 << 8, OR itself >> 4: low byte c0 | c1 << 4
        w = c.view(np.uint16)
        t = work.t16[:m // 2]
        np.right_shift(w, np.uint16(4), out=t)
        np.bitwise_or(t, w, out=t)
    else:  # b == 2: uint32 c0 | c1 << 8 | c2 << 16 | c3 << 24, folded twice: low byte c0 | c1 << 2 | ..
        w = c.view(np.uint32)
        t, t2 = work.t32[:m // 4], work.t32b[:m // 4]
        np.right_shift(w, np.uint32(6), out=t)
        np.bitwise_or(t, w, out=t)
        np.right_shift(t, np.uint32(12), out=t2)
        np.bitwise_or(t, t2, out=t)
    np.copyto(dst, t, casting="unsafe")


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

    Layout: ceil(n/8) bytes of sign bits (little-endian bit order, bit set = sign bit of x set), then n
    exponent bytes e (0 = zero, 1..254 = 2**(e-127); 255 is invalid).  size(n) = ceil(n/8) + n.
    |x| in [2**a, 2**(a+1)) is rounded stochastically up to 2**(a+1), else down to 2**a (subnormals:
    to 2**-126 or 0; zeros and powers of two are kept exactly; results past 2**127 are clamped to it).
    ``decode`` returns the as-used operator, scaled by 1/(1+omega) = 8/9 with omega = 1/8, which is
    contractive with alpha = 8/9.

    Randomness (part of the frame contract: the same seed gives the same frame on every machine):
    entry i takes u_i = the i-th 16-bit word of the ``random_raw`` stream of numpy's SFC64 bit
    generator seeded with the codec seed (each 64-bit output split into four little-endian words; SFC64
    is seeded through numpy's SeedSequence, a fixed algorithm, and its raw stream is stable across
    numpy versions), so one 64-bit draw serves four entries (16 random bits per entry, not 23: the
    draws bounded the encoder).  The rounding adds r_i = 128*u_i + 64 to the 23 mantissa bits m of
    |x| and keeps the carry into the exponent: up <=> m + r_i >= 2**23.  With m = 128*h + l (l < 128)
    that is P(up) = h/2**16 if l < 64 else (h+1)/2**16, within 64/2**23 = 2**-17 of the exact m/2**23.
    Bias: the raw operator has |E[C(x)] - x| <= 2**-17 * 2**a <= 2**-17 |x| per entry (zero for
    l = 0, -l/2**23 * 2**a for l < 64, (128-l)/2**23 * 2**a for l >= 64: 2**-24 * 2**a on average) and
    E|C(x) - x|^2 <= (omega + 2**-16) |x|^2 (normal x), so alpha = 8/9 holds up to O(2**-16).  Both bounds are
    tested exactly, over all 2**16 words, in tests/test_compress.py.
    """

    cid, name = 3, "natural"
    unbiased = True
    SCALE = 8.0 / 9.0
    # decode factors by sign byte: row j holds +-8/9 for the 8 sign bits of byte j
    _SIGN_SCALE = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"),
                           np.float32(-SCALE), np.float32(SCALE)).astype(np.float32)

    def size(self, n):
        return _ceil_div(n, 8) + n

    def alpha(self, n):
        return 8.0 / 9.0

    def encode(self, v, seed):
        # One chunked pass: code = min(((bits + r) >> 23) & 0xFF, 254), the carry of the mantissa
        # sum rounding the exponent up.  The sign bit does not matter: bits + r never carries out of
        # the exponent field for finite x, and the cast to uint8 drops bit 8.
        n = v.numel()
        xf = _np_cpu(v)
        bits = xf.view(np.uint32)
        bg = _natural_words(seed)
        code = np.empty(n, np.uint8)
        signs = np.empty(_ceil_div(n, 8), np.uint8)
        C = _VCHUNK  # a multiple of 8 (whole sign bytes) and of 4 (whole 64-bit draws) per chunk
        r = np.empty(min(n, C), np.uint32)
        neg = np.empty(min(n, C), bool)
        cap = np.full(min(n, C), 254, np.uint8)  # np.minimum against an array is SIMD, against a scalar not
        for i in range(0, n, C):
            b = bits[i:i + C]
            m = b.size
            rm = r[:m]
            np.copyto(rm, bg.random_raw(_ceil_div(m, 4)).view(np.uint16)[:m])
            np.left_shift(rm, np.uint32(7), out=rm)
            np.bitwise_or(rm, np.uint32(64), out=rm)
            np.add(rm, b, out=rm)
            np.right_shift(rm, np.uint32(23), out=rm)
            c = code[i:i + m]
            np.copyto(c, rm, casting="unsafe")  # keeps the 8 exponent bits, drops the sign bit
            np.minimum(c, cap[:m], out=c)  # 255 = rounded past 2**127 (or Inf/NaN input)
            np.signbit(xf[i:i + m], out=neg[:m])  # the sign bit, as a float op (faster than on uint32)
            signs[i // 8:i // 8 + _ceil_div(m, 8)] = np.packbits(neg[:m], bitorder="little")
        return [signs, code]

    def decode(self, mv, off, n, what):
        nb = _ceil_div(n, 8)
        sbits = np.frombuffer(mv, dtype=np.uint8, count=nb, offset=off)
        codes = np.frombuffer(mv, dtype=np.uint8, count=n, offset=off + nb)
        # value = float(code << 23) * (+-8/9 by the sign bit, read from a table by whole sign bytes)
        out = np.empty(n, np.uint32)
        C = _VCHUNK
        sg = np.empty((_ceil_div(min(n, C), 8), 8), np.float32)
        for i in range(0, n, C):
            m = min(C, n - i)
            c = codes[i:i + m]
            if int(c.max()) == 255:
                bad = i + int(np.flatnonzero(c == 255)[0])
                raise FrameError(f"{what}: natural exponent code 255 (Inf/NaN) at entry {bad}")
            o = out[i:i + m]
            np.copyto(o, c)
            np.left_shift(o, np.uint32(23), out=o)
            k = _ceil_div(m, 8)
            np.take(self._SIGN_SCALE, sbits[i // 8:i // 8 + k], axis=0, out=sg[:k], mode="wrap")
            f = o.view(np.float32)
            np.multiply(f, sg.reshape(-1)[:m], out=f)
        return out.view(np.float32)


class QuantCodec(_Codec):
    """b-bit quantisation with a per-block fp32 max-abs scale, deterministic nearest rounding.

    Layout: nb = ceil(n/BLOCK) fp32 scales s_j = max|x| over block j, then the n codes
    c = round(x * inv) + L (L = 2**(b-1) - 1, c in 0..2L, inv = fp32(L / max(s, tiny)), tiny the
    least fp32 with L / tiny finite) packed b bits each, little-endian bit order:
    size(n) = 4*nb + ceil(n*b/8).  Decoded value (c - L) * fp32(s / L).
    round() is round-to-nearest with ties to an even code c: the fp32 sum x*inv + (1.5*2**23 + L)
    is rounded to an integer by the addition itself, and its low mantissa bits are c.
    Deterministic (not stochastic), so the operator is biased but contractive directly: per
    entry |err| <= min(|x|, s/(2L)) (up to fp32 rounding, s * 2**-22) and the block max is exact,
    which gives ||C(x)-x||^2 <= c/(1+c) ||x||^2 with c = (B-1)/(4L^2), B = min(BLOCK, n):
    alpha = 1/(1+c)  (b=8, B=128: 0.998; b=4: 0.61; b=2: 0.03).
    """

    cid, name = 4, "quant"

    def __init__(self, bits: int, block: int = 128):
        self.bits = bits
        self.block = block
        self.L = (1 << (bits - 1)) - 1
        # x*inv + MAGIC is an integer in [2**23, 2**24): its mantissa's low 16 bits are the code
        self.MAGIC = np.float32(1.5 * 2.0**23 + self.L)
        with np.errstate(over="ignore"):
            tiny = np.float32(self.L) / np.finfo(np.float32).max
            while not np.isfinite(np.float32(self.L) / tiny):
                tiny = np.nextafter(tiny, np.float32(1))
        self.TINY = tiny  # scales below it (0 included) quantise with inv = L / TINY, never inf
        # CPU fast paths: b in (2, 4, 8, 16) packed chunk by chunk when every block ends on a byte
        self._fused = bits in (2, 4, 8, 16) and (block * bits) % 8 == 0

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
        if v.device.type == "cpu":
            return self._encode_cpu(_np_cpu(v), n, nb)
        return self._encode_torch(v, n, nb)

    def _encode_torch(self, v, n, nb):
        """The same frame as ``_encode_cpu``, by torch ops on v's device (GPU workers)."""
        B = self.block
        if n % B:
            vp = torch.zeros(nb * B, dtype=torch.float32, device=v.device)
            vp[:n] = v
        else:
            vp = v
        blocks = vp.view(nb, B)
        s = blocks.abs().amax(dim=1) if nb else torch.zeros(0, device=v.device)
        if not bool(torch.isfinite(s).all()):
            raise ValueError("quant codec: input holds NaN or Inf")
        inv = torch.full_like(s, float(self.L)).div_(s.clamp_min(float(self.TINY)))  # fp32 L / s, as numpy
        q = torch.mul(blocks, inv[:, None]).add_(float(self.MAGIC))  # |x| * inv <= L: no clamp needed
        codes = (q.view(torch.int32) & 0xFFFF).to(torch.uint8 if self.bits <= 8 else torch.int32)
        return [_np_cpu(s.float()).view(np.uint8), _pack_codes(_np_cpu(codes.reshape(-1)[:n]), self.bits)]

    def _encode_cpu(self, xn, n, nb):
        """One chunked pass over whole blocks (temporaries stay in cache), packing as it goes when
        the layout allows (``_fused``); the partial last block is quantised zero-padded."""
        b, B = self.bits, self.block
        full = n // B
        s = np.empty(nb, np.float32)
        cdt = np.uint8 if b <= 8 else np.uint16
        if self._fused:
            packed = np.empty(_ceil_div(n * b, 8), np.uint8)
        else:
            codes = np.empty(n, cdt)
        R = max(1, _VCHUNK // B)
        work = _QuantWork(min(full, R), B)
        with np.errstate(all="ignore"):  # NaN/Inf inputs are rejected below, once s is known
            for r0 in range(0, full, R):
                r1 = min(full, r0 + R)
                q = self._quant_rows(xn[r0 * B:r1 * B], r1 - r0, s[r0:r1], work)
                if self._fused:
                    _pack_chunk(q, b, packed[r0 * B * b // 8:r1 * B * b // 8], work)
                else:
                    np.copyto(codes[r0 * B:r1 * B], q, casting="unsafe")
            if n % B:
                xp = np.zeros(B, np.float32)
                xp[:n - full * B] = xn[full * B:]
                q = self._quant_rows(xp, 1, s[full:], _QuantWork(1, B))
                tail = q[:n - full * B].astype(cdt)  # the low code bits of the magic sum
                if self._fused:
                    packed[full * B * b // 8:] = _pack_codes(tail, b)
                else:
                    codes[full * B:] = tail
        if not np.isfinite(s).all():
            raise ValueError("quant codec: input holds NaN or Inf")
        return [s.view(np.uint8), packed if self._fused else _pack_codes(codes, b)]

    def _quant_rows(self, x, rows, s_out, work):
        """Scales (into s_out) and codes of ``rows`` whole blocks of the flat fp32 x.  Returns the
        uint32 bit patterns of x*inv + MAGIC, whose low b bits are the codes."""
        B = self.block
        m = rows * B
        a = work.u32[:m]
        np.bitwise_and(x.view(np.uint32), np.uint32(0x7FFFFFFF), out=a)  # |x| bits; NaN sorts above Inf
        np.maximum.reduceat(a, work.starts[:rows], out=s_out.view(np.uint32))  # int max: exact, SIMD
        inv = work.inv[:rows]
        np.maximum(s_out, self.TINY, out=inv)
        np.divide(np.float32(self.L), inv, out=inv)
        q = a.view(np.float32)
        np.multiply(x.reshape(rows, B), inv[:, None], out=q.reshape(rows, B))
        np.add(q, self.MAGIC, out=q)
        return a

    def decode(self, mv, off, n, what):
        B = self.block
        nb = _ceil_div(n, B)
        s = np.frombuffer(mv, dtype="<f4", count=nb, offset=off)
        if nb and not (np.isfinite(s).all() and (s >= 0).all()):
            bad = int(np.flatnonzero(~(np.isfinite(s) & (s >= 0)))[0])
            raise FrameError(f"{what}: quant scale {float(s[bad])!r} of block {bad} is not finite and >= 0")
        nbytes = _ceil_div(n * self.bits, 8)
        buf = np.frombuffer(mv, dtype=np.uint8, count=nbytes, offset=off + 4 * nb)
        if self.bits in (4, 8) and self._fused and n:
            return self._decode_chunked(buf, s, n, what)
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

    def _decode_chunked(self, buf, s, n, what):
        """b in (4, 8), blocks ending on a byte: rows of blocks at a time, the nibbles split by
        integer ops on a uint16 view (byte -> (low, high) as two bytes), then (c - L) * step."""
        b, B, L = self.bits, self.block, self.L
        step = (s / np.float32(L)).astype(np.float32)
        nb = step.size
        out = np.empty(n, np.float32)
        R = max(1, _VCHUNK // B)
        w = _ceil_div(min(n, R * B) * b, 8)  # bytes per chunk (at most)
        u16 = np.empty(w if b == 4 else 0, np.uint16)
        t16 = np.empty_like(u16)
        for r0 in range(0, nb, R):
            r1 = min(nb, r0 + R)
            e0, e1 = r0 * B, min(n, r1 * B)
            by = buf[e0 * b // 8:_ceil_div(e1 * b, 8)]
            if b == 4:
                u = u16[:by.size]
                np.copyto(u, by)
                np.left_shift(u, np.uint16(4), out=t16[:by.size])
                np.bitwise_or(u, t16[:by.size], out=u)
                np.bitwise_and(u, np.uint16(0x0F0F), out=u)
                c = u.view(np.uint8)  # the padding nibble past n (0 in valid frames) is checked too
            else:
                c = by
            if int(c.max()) > 2 * L:
                p = e0 + int(np.flatnonzero(c > 2 * L)[0])
                raise FrameError(f"{what}: quant code {int(c.max())} out of range 0..{2 * L} (entry {p})")
            o = out[e0:e1]
            np.subtract(c[:e1 - e0], np.float32(L), out=o)
            k = (e1 - e0) // B  # whole blocks in this chunk; then the partial last block, if any
            if k:
                o2 = o[:k * B].reshape(k, B)
                np.multiply(o2, step[r0:r0 + k, None], out=o2)
            if k * B < e1 - e0:
                o[k * B:] *= step[r0 + k]
        return out

    def _decode_table(self, buf, s, n, what):
        """b = 2, or b = 4 with an odd block (others: ``_decode_chunked``): each byte -> its 8/b
        values (code - L) by a 256-entry table, then * step."""
        b, B, L = self.bits, self.block, self.L
        per = 8 // b
        byte = np.arange(256, dtype=np.int32)[:, None]
        codes_tab = (byte >> (b * np.arange(per, dtype=np.int32))) & ((1 << b) - 1)  # (256, per)
        top = int(np.take(codes_tab.max(axis=1).astype(np.uint8), buf, mode="wrap").max())
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

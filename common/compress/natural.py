"""The ``natural`` value codec: sign + 8-bit exponent per entry, stochastic rounding to a power of
two from a seeded SFC64 stream (the class docstring gives the layout and the exact bias bounds)."""

from __future__ import annotations

import numpy as np

from ..errors import FrameError
from .bits import _VCHUNK, _ceil_div, _np_cpu
from .codec import _Codec
from .seeds import _MASK64


def _natural_words(seed: int):
    """The bit generator of NaturalCodec's rounding words (a function of its own so that a test can
    substitute one that yields every 16-bit word and check the rounding's exact expectation)."""
    return np.random.SFC64(int(seed) & _MASK64)


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


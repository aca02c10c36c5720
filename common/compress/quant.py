"""The ``quant:B[:BLOCK]`` value codec: B-bit codes with a per-block fp32 max-abs scale,
deterministic round-to-nearest, and its chunked CPU paths (fused quantise-and-pack, table and
nibble decoders) beside the torch path used for GPU tensors."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FrameError
from .bits import _CHUNK, _VCHUNK, _ceil_div, _np_cpu, _pack_codes, _unpack_codes
from .codec import _Codec


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


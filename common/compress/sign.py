"""The ``sign[:BLOCK]`` value codec: the scaled sign, one bit per entry plus one fp32 mean-|x| scale
per block (or for the whole vector)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FrameError
from .bits import _CHUNK, _ceil_div, _np_cpu
from .codec import _Codec


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

"""The value-codec interface, and the float codecs ``fp32`` / ``bf16`` / ``fp16``.

A value codec writes n fp32 values into a byte section of exactly ``size(n)`` bytes and reads them
back (``decode`` returns the values *as used*, e.g. natural's 8/9 scaling); it knows nothing of the
frame header or of which entries are sent (the structures in ``base``, ``sparse`` and ``lowrank``
do).  The codec ids written in the frame header are ``cid``: 0 fp32, 1 bf16, 2 fp16 (here),
3 natural, 4 quant, 5 sign (``natural``, ``quant``, ``sign``).  Each class documents its byte
layout and its contraction / unbiasedness claims.
"""

from __future__ import annotations

import numpy as np
import torch

from .bits import _np_cpu


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

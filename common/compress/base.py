"""The frame header every compressor writes, the ``Compressor`` base class with its header and
length checks, and the ``identity`` structure.

Header (little-endian, ``HEADER_SIZE`` = 18 bytes): magic b"EF", frame version, structure id,
value codec id, codec bits, codec block, numel (the package docstring gives the table).  Decoding
checks every header field against the compressor and the caller's shape *before* allocating
anything, and the exact frame length, raising ``FrameError`` saying what was wrong.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import FrameError
from .seeds import _subseed

if TYPE_CHECKING:
    from .codec import _Codec

MAGIC = b"EF"
VERSION = 1
_HEADER = struct.Struct("<2sBBBBIQ")
HEADER_SIZE = _HEADER.size  # 18
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

_STRUCT_IDS = {"identity": 0, "topk": 1, "randk": 2, "rankk": 3}
_CODEC_IDS = {"fp32": 0, "bf16": 1, "fp16": 2, "natural": 3, "quant": 4, "sign": 5}
_STRUCT_NAMES = {v: k for k, v in _STRUCT_IDS.items()}
_CODEC_NAMES = {v: k for k, v in _CODEC_IDS.items()}


# ----------------------------------------------------------------------------------------------
# shapes and frames


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


class Compressor:
    """A structure + value codec.  See the package docstring and the subclasses for frame layouts."""

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
                f"(bits={bits}, block={block}) but this compressor is {self.spec!r}, which expects structure "
                f"{self.struct_name} with codec {_CODEC_NAMES.get(c.cid, c.cid)} (bits={c.bits}, block={c.block})"
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


def encode_decode(comp: Compressor, x: torch.Tensor, seed: int = 0):
    """(frame, xhat): encode x and decode it back on x's device."""
    frame = comp.encode(x, seed)
    return frame, comp.decode(frame, tuple(x.shape), device=x.device)

"""Compressors of EF21-Muon: tensors <-> exact, self-describing byte frames.

Public API::

    comp = parse_spec("topk:0.05+natural")
    frame = comp.encode(x, seed)              # bytes, deterministic given (x, seed)
    xhat = comp.decode(frame, x.shape)        # float32 tensor of that shape
    len(frame) == comp.frame_size(x.shape, comp.frame_layout(frame))
    comp.alpha(x.shape)                       # E||C(x)-x||^2 <= (1-alpha)||x||^2 for C as used

A compressor is a *structure* (which entries / which subspace is sent) followed by a *value codec*
(how the sent numbers are written).

Structures: ``identity`` (all entries, ``base``), ``topk:F|K`` (k largest |x|), ``randk:F|K``
(k entries drawn from ``seed``; the frame carries the seed and no indices; both ``sparse``),
``rankk:R`` (rank-R factors P Q^T, ``lowrank``).  Value codecs (each module documents its byte
layout; ``codec``, ``natural``, ``quant``, ``sign``):
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
which numpy keeps stable: frames decode identically on any machine (``seeds``).

Modules: ``base`` (header, `Compressor`, identity), ``sparse`` and ``selection`` (topk, randk),
``lowrank`` (rankk), ``codec``, ``natural``, ``quant``, ``sign`` (value codecs), ``bits`` (bit
packing, varints, chunk sizes), ``seeds`` (random streams), ``spec`` (`parse_spec`).
"""

from __future__ import annotations

import sys

from .base import HEADER_SIZE, Compressor, Identity, encode_decode
from .codec import Bf16Codec, Fp16Codec, Fp32Codec
from .lowrank import RankK
from .natural import NaturalCodec
from .quant import QuantCodec
from .sign import SignCodec
from .sparse import RandK, TopK
from .spec import VALID_FORMS, parse_spec

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("efmuon.common.compress assumes a little-endian host")

__all__ = [
    "Compressor",
    "parse_spec",
    "encode_decode",
    "VALID_FORMS",
    "HEADER_SIZE",
    "Identity",
    "TopK",
    "RandK",
    "RankK",
    "Fp32Codec",
    "Bf16Codec",
    "Fp16Codec",
    "NaturalCodec",
    "QuantCodec",
    "SignCodec",
]

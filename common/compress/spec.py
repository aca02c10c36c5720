"""Compressor specs: ``parse_spec`` turns a spelling such as ``topk:0.05+natural`` into a
``Compressor`` (canonical ``spec``), or raises ``ConfigError`` naming what is wrong and listing
``VALID_FORMS``."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import _STRUCT_IDS, Compressor, Identity
from .codec import Bf16Codec, Fp16Codec, Fp32Codec
from .lowrank import RankK
from .natural import NaturalCodec
from .quant import QuantCodec
from .sign import SignCodec
from .sparse import RandK, TopK

if TYPE_CHECKING:
    from .codec import _Codec

VALID_FORMS = (
    "identity, identity:bf16, identity:fp16, natural, quant:BITS (BITS 2..16), "
    "quant:BITS:BLOCK, sign, sign:BLOCK, topk:FRACTION (0<F<=1) or topk:K (integer >= 1), "
    "randk:FRACTION|K, rankk:R (integer >= 1), and STRUCTURE+CODEC with STRUCTURE in "
    "{identity, topk:.., randk:.., rankk:..} and CODEC in {fp32, bf16, fp16, natural, quant:BITS[:BLOCK], "
    "sign[:BLOCK]} (rankk takes fp32/bf16/fp16 only), e.g. topk:0.05+natural, topk:0.1+bf16, "
    "rankk:4+bf16, randk:0.1+quant:8"
)

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


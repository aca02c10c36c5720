"""Which norm, scale and step multiplier each layer gets: `LayerSpec`, the presets and their
spectral scale rules, the default scales of the other norms, and `assign_norms` (pattern
overrides, then vectors -> bias_rms, embeddings and heads -> sign, everything else -> spectral)."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError

NORMS = ("spectral", "sign", "colnorm", "rownorm", "bias_rms")
SCALE_RULES = ("muon", "scion", "moonlight")
PRESETS = ("muon", "scion", "gluon", "muonmax", "muonmax-momo", "adamw")

# preset -> scale rule of its spectral layers.  gluon uses Scion's norms (its adaptive layer-wise
# step sizes live in the step-size schedule, not here); muonmax uses Muon's norms (its global step
# scaled by the sum of nuclear norms lives in the step-size schedule too).
_PRESET_SCALE_RULE = {"muon": "muon", "scion": "scion", "gluon": "scion", "muonmax": "muon", "muonmax-momo": "muon",
                      "adamw": "muon"}  # adamw takes no LMO step; its specs only describe the layers

# Scion's nanoGPT config gives the Sign (tied embedding / lm_head) group a radius 60x the blocks'
# (scale 3000 vs 50; CNN example: 16x).  We do NOT make it the default (default lr_mult is 1.0 for
# every norm: one global step size, as in the EF21-Muon / Gluon analysis); tasks that want Scion's
# tuning pass lr_mult={"sign": SCION_SIGN_LR_MULT}.
SCION_SIGN_LR_MULT = 60.0


@dataclass(frozen=True)
class LayerSpec:
    """One layer's geometry: lmo(G) = scale * argmin_{||Z||_(norm) <= 1} <G, Z>.

    `scale` already includes the scale rule (e.g. sqrt(max(1, rows/cols)) for Muon spectral
    layers, 1/d_in for sign layers).  `lr_mult` multiplies the global step size t for this layer
    (X_i += lr_mult * t * lmo_i(G_i)); it is applied by the step, not by `lmo_direction`.
    """

    name: str
    shape: tuple[int, ...]
    norm: str
    scale: float
    lr_mult: float = 1.0
    stacked: bool = False  # the leading dim indexes independent matrices (MoE experts): (E, rows, cols...)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "stacked", bool(self.stacked))
        if self.stacked and len(self.shape) < 3:
            raise ConfigError(
                f"layer {self.name!r}: a stacked (per-expert) parameter needs >= 3 dims (E, rows, cols), "
                f"got shape {self.shape}"
            )
        if self.norm not in NORMS:
            raise ConfigError(
                f"layer {self.name!r}: unknown norm {self.norm!r}; valid norms are {', '.join(NORMS)}"
            )
        if self.norm == "spectral" and len(self.shape) < 2:
            raise ConfigError(
                f"layer {self.name!r}: the spectral norm needs a parameter with >= 2 dims, got shape "
                f"{self.shape}; use bias_rms (or sign) for vectors and scalars"
            )
        for field in ("scale", "lr_mult"):
            v = float(getattr(self, field))
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"layer {self.name!r}: {field} must be a finite number > 0, got {v}")
            object.__setattr__(self, field, v)


def matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) = (d_out, d_in) of the matrix view of a parameter of this shape.

    >= 2-D: (shape[0], prod(shape[1:]))  (conv (out, in, k, k) -> (out, in*k*k));
    1-D (n,): (n, 1), a column;  0-D: (1, 1).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], math.prod(shape[1:])


def block_dims(spec: "LayerSpec") -> tuple[int, int, int]:
    """(E, rows, cols): a stacked parameter (E, d_out, d_in...) is E matrices of (d_out, prod(d_in...));
    any other is one matrix, `matrix_dims` of its shape."""
    if spec.stacked:
        return spec.shape[0], *matrix_dims(spec.shape[1:])
    return 1, *matrix_dims(spec.shape)


def spectral_scale(shape: Sequence[int], rule: str) -> float:
    """Scale of a spectral layer, rows = d_out = shape[0], cols = d_in = prod(shape[1:]).

    muon:      sqrt(max(1, rows/cols))      (update RMS 1/sqrt(cols) for an exact U V^T)
    scion:     sqrt(rows/cols)              (RMS->RMS operator norm of the update exactly 1)
    moonlight: 0.2 * sqrt(max(rows, cols))  (update RMS 0.2, AdamW-matched)
    """
    if rule not in SCALE_RULES:
        raise ConfigError(f"unknown spectral scale rule {rule!r}; valid rules are {', '.join(SCALE_RULES)}")
    if len(shape) < 2:
        raise ConfigError(f"spectral_scale needs a shape with >= 2 dims, got {tuple(shape)}")
    rows, cols = matrix_dims(shape)
    if rule == "muon":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "scion":
        return math.sqrt(rows / cols)
    return 0.2 * math.sqrt(max(rows, cols))


def _default_scale(shape: tuple[int, ...], norm: str, rule: str) -> float:
    rows, cols = matrix_dims(shape)
    if norm == "spectral":
        return spectral_scale(shape, rule)
    if norm == "sign":
        return 1.0 / cols  # Scion Sign(normalized=True): sign(G) / d_in
    if norm == "colnorm":
        return math.sqrt(rows)  # Scion ColNorm(normalized=False): G / (||col||_2 / sqrt(d_out))
    if norm == "rownorm":
        return 1.0 / math.sqrt(cols)  # Scion RowNorm(normalized=True): G / (||row||_2 sqrt(d_in))
    return 1.0  # bias_rms


EMBEDDING_PATTERN = re.compile(
    r"(^|\.)(\w*embed\w*|wte|wpe|tok_emb\w*|pos_emb\w*)(\.|$)", re.IGNORECASE
)
EXPERT_PATTERN = re.compile(r"(^|\.)\w*experts?\w*(\.|$)", re.IGNORECASE)
HEAD_PATTERN = re.compile(r"(^|\.)(lm_head|head|classifier|output)\.weight$", re.IGNORECASE)


def _pattern_matches(pattern: str, name: str) -> bool:
    """fnmatch (case-sensitive) on the full name, or a regex that fully matches the name."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _parse_override(pattern: str, value: str, rule: str) -> tuple[str, str | float]:
    """'norm' | 'norm:scale_rule' (spectral only) | 'norm:<float>' -> (norm, rule or scale)."""
    norm, _, extra = str(value).partition(":")
    norm = norm.strip()
    extra = extra.strip()
    if norm not in NORMS:
        raise ConfigError(
            f"override {pattern!r}: unknown norm {norm!r}; valid norms are {', '.join(NORMS)} "
            f"(optionally 'spectral:<{'|'.join(SCALE_RULES)}>' or '<norm>:<scale>')"
        )
    if not extra:
        return norm, rule
    if extra in SCALE_RULES:
        if norm != "spectral":
            raise ConfigError(
                f"override {pattern!r}: scale rule {extra!r} applies to spectral layers only; "
                f"give '{norm}:<number>' for an explicit scale"
            )
        return norm, extra
    try:
        return norm, float(extra)
    except ValueError:
        raise ConfigError(
            f"override {pattern!r}: {extra!r} is neither a scale rule ({', '.join(SCALE_RULES)}) "
            f"nor a number"
        ) from None


def assign_norms(
    named_shapes: Iterable[tuple[str, Sequence[int]]],
    preset: str = "muon",
    overrides: Mapping[str, str] | None = None,
    embedding_names: Iterable[str] = frozenset(),
    head_names: Iterable[str] = frozenset(),
    lr_mult: Mapping[str, float] | None = None,
    stacked_names: Iterable[str] = frozenset(),
) -> list[LayerSpec]:
    """One LayerSpec per (name, shape), in order.

    Stacked (per-expert) parameters: names in `stacked_names`, or >= 3-D parameters whose name has a
    component containing 'expert' (EXPERT_PATTERN), are E independent matrices (E, rows, cols...): the
    norm applies to each expert's matrix (spectral: one batched Newton-Schulz over the E matrices, each
    scaled by the rule of its (rows, cols) shape; sign 1/d_in of one expert), so the dual norm is the
    sum over the experts.  Every norm but bias_rms may be stacked.

    Automatic choice (first rule that applies):
      1. `overrides`: {pattern: "norm" | "norm:scale_rule" | "norm:<scale>"}; patterns are fnmatch
         globs or regexes (full match) on the parameter name; the first matching pattern wins.
      2. 0-D and 1-D parameters (biases, gains, scalars) -> bias_rms.
      3. embeddings and heads -> sign: names in `embedding_names` / `head_names`, or matching
         EMBEDDING_PATTERN (a name component containing 'embed', or wte/wpe/tok_emb*/pos_emb*) or
         HEAD_PATTERN ('lm_head|head|classifier|output' + '.weight' at the end).
      4. everything else (hidden 2-D matrices, conv filters) -> spectral.
    Presets choose the spectral scale rule: muon/muonmax/muonmax-momo -> 'muon', scion/gluon -> 'scion'.
    Other scales: sign 1/d_in, colnorm sqrt(d_out), rownorm 1/sqrt(d_in), bias_rms 1.

    lr_mult: {norm: multiplier}; default 1.0 for every norm.  Scion's own configs give sign
    (embedding/head) layers a ~60x larger radius (SCION_SIGN_LR_MULT); we leave that to the task.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets are {', '.join(PRESETS)}")
    rule = _PRESET_SCALE_RULE[preset]
    mults = _lr_mults(lr_mult)
    parsed = [(pat, *_parse_override(pat, val, rule)) for pat, val in (overrides or {}).items()]
    sign_names = set(embedding_names) | set(head_names)
    stacked_set = set(stacked_names)

    specs: list[LayerSpec] = []
    seen: set[str] = set()
    for name, shape in named_shapes:
        if name in seen:
            raise ConfigError(f"parameter name {name!r} appears twice")
        seen.add(name)
        shape = tuple(int(s) for s in shape)
        norm, scale_choice = _choose_norm(name, shape, parsed, rule, sign_names)
        if norm == "spectral" and len(shape) < 2:
            raise ConfigError(
                f"parameter {name!r} has shape {shape}; the spectral norm needs >= 2 dims"
            )
        stacked = len(shape) >= 3 and norm != "bias_rms" and (
            name in stacked_set or EXPERT_PATTERN.search(name) is not None)
        if isinstance(scale_choice, float):
            scale = scale_choice
        else:
            scale = _default_scale(shape[1:] if stacked else shape, norm, scale_choice)
        specs.append(LayerSpec(name, shape, norm, scale, mults[norm], stacked))
    return specs


def _lr_mults(lr_mult: Mapping[str, float] | None) -> dict[str, float]:
    """{norm: step multiplier} for every norm: 1.0 unless `lr_mult` names it."""
    mults = {norm: 1.0 for norm in NORMS}
    for norm, mult in (lr_mult or {}).items():
        if norm not in NORMS:
            raise ConfigError(f"lr_mult: unknown norm {norm!r}; valid norms are {', '.join(NORMS)}")
        mults[norm] = float(mult)
    return mults


def _choose_norm(name: str, shape: tuple[int, ...], parsed: list, rule: str,
                 sign_names: set[str]) -> tuple[str, str | float]:
    """(norm, scale rule or explicit scale) of one parameter: the first override whose pattern
    matches, else rules 2-4 of `assign_norms` with the preset's scale rule."""
    for pat, norm, choice in parsed:
        if _pattern_matches(pat, name):
            return norm, choice
    if len(shape) <= 1:
        return "bias_rms", rule
    if name in sign_names or EMBEDDING_PATTERN.search(name) or HEAD_PATTERN.search(name):
        return "sign", rule
    return "spectral", rule


def assign_norms_for_model(
    model: torch.nn.Module,
    preset: str = "muon",
    overrides: Mapping[str, str] | None = None,
    head_names: Iterable[str] = frozenset(),
    lr_mult: Mapping[str, float] | None = None,
    stacked_names: Iterable[str] = frozenset(),
) -> list[LayerSpec]:
    """assign_norms over model.named_parameters() (that order), with every nn.Embedding /
    nn.EmbeddingBag weight treated as an embedding (sign) regardless of its name."""
    embedding_names = {
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    }
    named_shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return assign_norms(
        named_shapes,
        preset=preset,
        overrides=overrides,
        embedding_names=embedding_names,
        head_names=head_names,
        lr_mult=lr_mult,
        stacked_names=stacked_names,
    )

"""Link profiles: what a client's network link is (rate per direction, delay, jitter, loss), parsed
from presets or from 'up=10mbit,down=50mbit,delay=20ms' specs, and the per-client assignment of
profiles from a single link, a mix drawn per client, a trace file or a `[links]` table.

Parsing only: the relay that emulates a profile in the worker's process is `efmuon.worker.relay`;
kernel shaping is `efmuon.server.netns`.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import re
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["LinkProfile", "PRESETS", "parse_link"]

# The loss model of a link (`LinkProfile.loss`), shared by the relay's emulation and the federated
# simulator's clock: a loss is drawn once per this many bytes of data, and costs a retransmission
# timeout of max(MIN_RTO, 2 * delay).
LOSS_SEGMENT = 64 * 1024
MIN_RTO = 0.200


# --------------------------------------------------------------------------------------------------
# Link profiles
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkProfile:
    """One client's link. Rates are in bits/s (None means unlimited). `delay_s` is one-way and is
    applied in each direction, so a round trip takes at least 2*delay_s. `loss` is a probability per
    64 KiB of data, modelled as a retransmission delay."""

    up_bps: float | None = None
    down_bps: float | None = None
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        for name in ("up_bps", "down_bps"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"LinkProfile.{name} must be a positive number of bits/s or None (unlimited), got {v!r}")
        for name in ("delay_s", "jitter_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"LinkProfile.{name} must be a number of seconds >= 0, got {v!r}")
        if not (isinstance(self.loss, (int, float)) and 0 <= self.loss < 1):
            raise ConfigError(f"LinkProfile.loss must be a fraction in [0, 1), got {self.loss!r}")

    @property
    def is_shaped(self) -> bool:
        """True if the profile changes anything (a rate, delay, jitter or loss)."""
        return bool(self.up_bps or self.down_bps or self.delay_s or self.jitter_s or self.loss)

    def direction(self, direction: str) -> tuple[float | None, bool]:
        """(rate in bits/s or None, whether this direction needs shaping) for "up" or "down"."""
        rate = self.up_bps if direction == "up" else self.down_bps
        return rate, bool(rate or self.delay_s or self.jitter_s or self.loss)

    def to_spec(self) -> str:
        """A string that `parse_link` turns back into this profile."""
        if not self.is_shaped:
            return "none"
        parts = []
        if self.up_bps:
            parts.append(f"up={_fmt_rate(self.up_bps)}")
        if self.down_bps:
            parts.append(f"down={_fmt_rate(self.down_bps)}")
        if self.delay_s:
            parts.append(f"delay={_fmt_time(self.delay_s)}")
        if self.jitter_s:
            parts.append(f"jitter={_fmt_time(self.jitter_s)}")
        if self.loss:
            parts.append(f"loss={self.loss * 100:.12g}%")
        return ",".join(parts)


PRESETS: dict[str, LinkProfile] = {
    "none": LinkProfile(),
    "dsl": LinkProfile(up_bps=1e6, down_bps=16e6, delay_s=0.030),
    "lte": LinkProfile(up_bps=10e6, down_bps=30e6, delay_s=0.050),
    "wifi": LinkProfile(up_bps=50e6, down_bps=100e6, delay_s=0.005),
    "dc-10g": LinkProfile(up_bps=10e9, down_bps=10e9, delay_s=0.00005),
}

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUM = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)"
_RATE_RE = re.compile(_NUM + r"\s*(bit|kbit|mbit|gbit)")
_TIME_RE = re.compile(_NUM + r"\s*(us|ms|s)")
_LOSS_RE = re.compile(_NUM + r"\s*(%?)")
_KEYS = {"up": "up_bps", "down": "down_bps", "delay": "delay_s", "jitter": "jitter_s", "loss": "loss"}

VALID_FORMS = (
    "Valid forms: a preset (" + ", ".join(PRESETS) + "), or comma-separated key=value pairs: "
    "up=/down= a rate <number>bit|kbit|mbit|gbit (decimal, bits/s; 'none' = unlimited), "
    "delay=/jitter= a time <number>us|ms|s (one-way), loss= <number>% or a fraction in [0, 1); "
    "a preset may come first and be overridden. "
    "Examples: 'lte', 'up=10mbit,down=50mbit,delay=20ms,jitter=5ms,loss=0.1%', 'dsl,delay=50ms'."
)


def _fmt_rate(bps: float) -> str:
    for unit, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= mult:
            return f"{bps / mult:.12g}{unit}"
    return f"{bps:.12g}bit"


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.12g}s"
    if s >= 1e-3:
        return f"{s * 1e3:.12g}ms"
    return f"{s * 1e6:.12g}us"


def parse_link(spec: str | LinkProfile | None) -> LinkProfile:
    """Parse a link spec: a preset name, or `up=10mbit,down=50mbit,delay=20ms,jitter=5ms,loss=0.1%`,
    optionally starting with a preset to override (`dsl,delay=50ms`). Rates are stored in bits/s and
    times in seconds. None and "none" mean an unshaped link. Raises ConfigError naming the bad part."""
    if spec is None:
        return PRESETS["none"]
    if isinstance(spec, LinkProfile):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"link spec must be a string, got {type(spec).__name__}. {VALID_FORMS}")
    text = spec.strip().lower()
    if not text:
        raise ConfigError(f"link spec is empty. {VALID_FORMS}")
    parts = [p.strip() for p in text.split(",")]
    values: dict[str, object] = {}
    if "=" not in parts[0]:
        name = parts.pop(0)
        if name not in PRESETS:
            raise ConfigError(f"link spec {spec!r}: unknown preset {name!r}. {VALID_FORMS}")
        values = dataclasses.asdict(PRESETS[name])
    seen: set[str] = set()
    for part in parts:
        key, eq, val = (s.strip() for s in part.partition("="))
        if not eq:
            raise ConfigError(f"link spec {spec!r}: part {part!r} is not key=value "
                              f"(a preset may only come first). {VALID_FORMS}")
        if key not in _KEYS:
            raise ConfigError(f"link spec {spec!r}: unknown key {key!r} in {part!r}; "
                              f"keys are {', '.join(_KEYS)}. {VALID_FORMS}")
        if key in seen:
            raise ConfigError(f"link spec {spec!r}: key {key!r} given twice. {VALID_FORMS}")
        seen.add(key)
        values[_KEYS[key]] = _parse_value(spec, part, key, val)
    try:
        return LinkProfile(**values)  # type: ignore[arg-type]
    except ConfigError as e:
        raise ConfigError(f"link spec {spec!r}: {e}. {VALID_FORMS}") from None


def _parse_value(spec: str, part: str, key: str, val: str) -> float | None:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"link spec {spec!r}: bad value in {part!r}: {why}. {VALID_FORMS}")

    if key in ("up", "down"):
        if val in ("none", "unlimited"):
            return None
        m = _RATE_RE.fullmatch(val)
        if not m:
            raise bad("a rate needs a number and a unit bit, kbit, mbit or gbit, e.g. 10mbit")
        v = float(m.group(1)) * _RATE_UNITS[m.group(2)]
        if not (math.isfinite(v) and v > 0):
            raise bad("a rate must be > 0 (use 'none' for unlimited)")
        return v
    if key in ("delay", "jitter"):
        m = _TIME_RE.fullmatch(val)
        if not m:
            raise bad("a time needs a number and a unit us, ms or s, e.g. 20ms")
        v = float(m.group(1)) * _TIME_UNITS[m.group(2)]
        if not math.isfinite(v):
            raise bad("a time must be finite")
        return v
    m = _LOSS_RE.fullmatch(val)
    if not m:
        raise bad("loss is a percentage like 0.1% or a fraction like 0.001")
    v = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if not 0 <= v < 1:
        raise bad("loss must be in [0%, 100%)")
    return v


def parse_link_mix(spec) -> list[tuple[str, LinkProfile, float]]:
    """'dsl=0.3,lte=0.5,wifi=0.2' or {'dsl': 0.3, ...} -> [(preset, profile, probability)], summing to 1.

    Weights must be >= 0 with a positive sum; they are normalised.
    """
    if isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, eq, w = (s.strip() for s in part.partition("="))
            if not eq:
                raise ConfigError(f"link_mix {spec!r}: part {part!r} is not PRESET=WEIGHT "
                                  f"(e.g. 'dsl=0.3,lte=0.5,wifi=0.2'; presets: {', '.join(PRESETS)})")
            try:
                items.append((name, float(w)))
            except ValueError:
                raise ConfigError(f"link_mix {spec!r}: weight {w!r} of {name!r} is not a number") from None
    elif isinstance(spec, dict):
        items = list(spec.items())
    else:
        raise ConfigError(f"link_mix must be a string like 'dsl=0.3,lte=0.5,wifi=0.2' or a table, got {spec!r}")
    if not items:
        raise ConfigError(f"link_mix {spec!r} is empty; e.g. 'dsl=0.3,lte=0.5,wifi=0.2'")
    out, seen = [], set()
    for name, w in items:
        name = str(name).strip().lower()
        if name not in PRESETS:
            raise ConfigError(f"link_mix: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        if name in seen:
            raise ConfigError(f"link_mix: preset {name!r} given twice")
        seen.add(name)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"link_mix: weight of {name!r} must be a number >= 0, got {w!r}")
        out.append((name, PRESETS[name], float(w)))
    total = sum(w for _, _, w in out)
    if total <= 0:
        raise ConfigError(f"link_mix {spec!r}: the weights sum to 0")
    return [(n, p, w / total) for n, p, w in out]


def load_link_trace(path: str) -> list[tuple[int, LinkProfile]]:
    """Rows `client,up_bps,down_bps,delay_ms[,jitter_ms]` (a header row is optional; 0 or '' = unlimited)."""
    try:
        fh = open(path, newline="")
    except OSError as exc:
        raise ConfigError(f"link_trace {path!r} cannot be read: {exc}") from None
    rows = []
    with fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if lineno == 1 and not row[0].lstrip("-").isdigit():
                continue  # header
            if len(row) < 4:
                raise ConfigError(f"link_trace {path}:{lineno}: expected client,up_bps,down_bps,delay_ms[,jitter_ms], got {row}")
            try:
                client = int(row[0])
                up = float(row[1]) if row[1] else 0.0
                down = float(row[2]) if row[2] else 0.0
                delay = float(row[3]) / 1e3 if row[3] else 0.0
                jitter = float(row[4]) / 1e3 if len(row) > 4 and row[4] else 0.0
                if client < 0:
                    raise ValueError("client ids are >= 0")
                prof = LinkProfile(up_bps=up or None, down_bps=down or None, delay_s=delay, jitter_s=jitter)
            except (ValueError, ConfigError) as exc:
                raise ConfigError(f"link_trace {path}:{lineno}: bad row {row}: {exc}") from None
            rows.append((client, prof))
    if not rows:
        raise ConfigError(f"link_trace {path!r} has no rows (expected client,up_bps,down_bps,delay_ms)")
    return rows

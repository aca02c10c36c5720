"""Federated rules every driver shares: which settings make a run federated, who is sampled in a round
(seeded, so `simulate` and the server pick the same cohort), per-client compute speeds, the simulated
transfer time of a link, and the task cut into n client shards."""
from __future__ import annotations

from typing import TYPE_CHECKING

import math
import random

from .errors import ConfigError
from .links import LOSS_SEGMENT, MIN_RTO, LinkProfile
from .tasks import derive_seed, make_task

if TYPE_CHECKING:  # annotations only: the config sits above this module (it validates with it)
    from .config import RunConfig

FEDERATED_KEYS = ("clients", "participation", "link", "link_mix", "link_trace", "deadline", "compute_scale",
                  "compute_seconds")


def is_federated(cfg: RunConfig) -> bool:
    """True when any federated setting is given: `simulate` then runs this module's loop."""
    return any(getattr(cfg, k) is not None for k in FEDERATED_KEYS) or bool(getattr(cfg, "links", None))


def parse_compute_scale(spec: str | float | None) -> tuple:
    """'1' / '2.5' (constant), 'lognormal:SIGMA' (median 1), 'uniform:LO:HI' -> a parsed tuple."""
    if spec is None:
        return ("const", 1.0)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"compute_scale must be a string, got {spec!r}")
    text = spec.strip().lower()
    forms = "a positive number (constant factor), 'lognormal:SIGMA' (median 1) or 'uniform:LO:HI'"
    parts = text.split(":")
    try:
        nums = [float(x) for x in parts[1:]] if len(parts) > 1 else []
        if len(parts) == 1:
            v = float(parts[0])
            if not (math.isfinite(v) and v > 0):
                raise ValueError
            return ("const", v)
        if parts[0] == "lognormal" and len(nums) == 1 and math.isfinite(nums[0]) and nums[0] >= 0:
            return ("lognormal", nums[0])
        if parts[0] == "uniform" and len(nums) == 2 and 0 < nums[0] <= nums[1] and math.isfinite(nums[1]):
            return ("uniform", nums[0], nums[1])
    except ValueError:
        pass
    raise ConfigError(f"compute_scale={spec!r} is not valid; use {forms}")


def compute_factors(spec, n: int, seed: int) -> list[float]:
    """Per-client speed factor (multiplies the compute time), a pure function of (spec, seed, client)."""
    kind = parse_compute_scale(spec)
    if kind[0] == "const":
        return [kind[1]] * n
    out = []
    for j in range(n):
        rng = random.Random(derive_seed("compute-scale", seed, j))
        out.append(math.exp(rng.gauss(0.0, kind[1])) if kind[0] == "lognormal" else rng.uniform(kind[1], kind[2]))
    return out


def sample_clients(seed: int, round_: int, n: int, m: int) -> list[int]:
    """The m clients of round k (sorted), a pure function of (seed, k)."""
    if m >= n:
        return list(range(n))
    return sorted(random.Random(derive_seed("participation", seed, round_)).sample(range(n), m))


def clients_per_round(participation: float | None, n: int) -> int:
    if participation is None:
        return n
    return max(1, min(n, int(math.floor(participation * n + 0.5))))


def transfer_seconds(profile: LinkProfile, direction: str, nbytes: int, rng: random.Random) -> float:
    """Simulated time of one transfer of nbytes over the link: latency + jitter + size/rate + lost segments."""
    rate = profile.up_bps if direction == "up" else profile.down_bps
    t = profile.delay_s
    if profile.jitter_s:
        t = max(0.0, t + rng.uniform(-profile.jitter_s, profile.jitter_s))
    if rate:
        t += nbytes * 8.0 / rate
    if profile.loss and nbytes:
        segments = -(-nbytes // LOSS_SEGMENT)
        lost = sum(1 for _ in range(segments) if rng.random() < profile.loss)
        t += lost * max(MIN_RTO, 2 * profile.delay_s)
    return t


def task_for_clients(cfg: RunConfig, n: int):
    """The task cut into S shards: S = n if it allows, else the largest S that works (binary search)."""
    opts = cfg.task_options
    try:
        return make_task(cfg.task, n, seed=cfg.seed, **opts), n
    except ConfigError as first:
        if n == 1:
            raise
        try:
            best = make_task(cfg.task, 1, seed=cfg.seed, **opts)
        except ConfigError:
            raise first from None
        lo, hi = 1, n - 1  # lo works
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                t = make_task(cfg.task, mid, seed=cfg.seed, **opts)
                lo, best = mid, t
            except ConfigError:
                hi = mid - 1
        if best.n_workers != lo:
            best = make_task(cfg.task, lo, seed=cfg.seed, **opts)
        return best, lo

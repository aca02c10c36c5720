"""Federated rules every driver shares: which settings make a run federated, who is sampled in a round
(seeded, so `simulate` and the server pick the same cohort), per-client compute speeds, the simulated
transfer time of a link, and the task cut into n client shards."""
from __future__ import annotations

import math
import random

from .config import RunConfig, parse_compute_scale
from .errors import ConfigError
from .links import LOSS_SEGMENT, MIN_RTO, PRESETS, LinkProfile, load_link_trace, parse_link, parse_link_mix
from .tasks import derive_seed, make_task
from .usermodel import make_run_task

FEDERATED_KEYS = ("clients", "participation", "link", "link_mix", "link_trace", "deadline", "compute_scale",
                  "compute_seconds", "adaptive_deadline")


def is_federated(cfg: RunConfig) -> bool:
    """True when any federated setting is given: `simulate` then runs this module's loop."""
    return any(getattr(cfg, k) is not None for k in FEDERATED_KEYS) or bool(getattr(cfg, "links", None))


# the settings that make the networked server run cohorts (links alone keep its synchronous rounds)
COHORT_KEYS = ("clients", "participation", "deadline", "compute_scale", "compute_seconds", "adaptive_deadline")


def runs_cohorts(cfg: RunConfig) -> bool:
    """True when the networked server samples a cohort per round (server.cohorts) rather than waiting
    for all --workers every round."""
    return any(getattr(cfg, k, None) is not None for k in COHORT_KEYS)


def federation_size(cfg: RunConfig) -> int:
    """n: `clients` when given, else `workers`."""
    return int(cfg.clients or cfg.workers)




def compute_factors(spec, n: int, seed: int) -> list[float]:
    """Per-client speed factor (multiplies the compute time), a pure function of (spec, seed, client).
    Per-client overrides (`'1,3=40,7=40'`: client 3 and 7 forty times slower) replace the drawn factor."""
    kind = parse_compute_scale(spec)
    if kind[0] == "const":
        out = [kind[1]] * n
    else:
        out = []
        for j in range(n):
            rng = random.Random(derive_seed("compute-scale", seed, j))
            out.append(math.exp(rng.gauss(0.0, kind[1])) if kind[0] == "lognormal" else rng.uniform(kind[1], kind[2]))
    for j, factor in kind[-1].items() if isinstance(kind[-1], dict) else ():
        if not 0 <= j < n:
            raise ConfigError(f"compute_scale: client {j} is not one of the run's clients 0..{n - 1}")
        out[j] = factor
    return out


def sample_clients(seed: int, round_: int, n: int, m: int) -> list[int]:
    """The m clients of round k (sorted), a pure function of (seed, k)."""
    return sample_cohort(seed, round_, range(n), m)


def sample_cohort(seed: int, round_: int, eligible, m: int) -> list[int]:
    """The m clients of round k drawn from `eligible` (sorted ids), a pure function of (seed, k, eligible).

    With every client eligible (range(n)) this is `sample_clients`: random.sample picks positions, so
    the networked server (which samples from the clients that are live) and `simulate` pick the same
    cohort whenever all n are there."""
    pool = sorted(eligible)
    if m >= len(pool):
        return pool
    return sorted(random.Random(derive_seed("participation", seed, round_)).sample(pool, m))


def client_batch(task, shards: int, n: int, j: int, k: int):
    """Client j's batch of round k when n clients share `shards` data shards (`task_for_clients`):
    shard j mod S, and the clients that share it draw different batches (simulate's rule, module
    simulate.federated). With S == n this is `task.batch(j, k)`."""
    reps = -(-n // shards)
    return task.batch(j % shards, k * reps + j // shards)


def clients_per_round(participation: float | None, n: int) -> int:
    if participation is None:
        return n
    return max(1, min(n, int(math.floor(participation * n + 0.5))))


ADAPTIVE_ROUNDS = 10  # the adaptive deadline looks at the clients' times of this many recent rounds
ADAPTIVE_MIN_TIMES = 10  # ... once it has at least this many


class AdaptiveDeadline:
    """The round deadline of `--adaptive-deadline K` (hivemind's recurring request): median + K * MAD of the
    completion times of the clients that made the last ADAPTIVE_ROUNDS rounds, never above `deadline`
    (the fixed one, when given); before ADAPTIVE_MIN_TIMES times are known, `deadline` (or None). A pure
    function of the times fed to it, so `simulate` (simulated times) and the server (measured) share it."""

    def __init__(self, k: float | None, deadline: float | None):
        self.k, self.cap = k, deadline
        self.rounds: list[list[float]] = []

    def add_round(self, times) -> None:
        self.rounds = (self.rounds + [list(times)])[-ADAPTIVE_ROUNDS:]

    def current(self) -> float | None:
        if self.k is None:
            return self.cap
        times = sorted(t for r in self.rounds for t in r)
        if len(times) < ADAPTIVE_MIN_TIMES:
            return self.cap
        med = _median(times)
        mad = _median(sorted(abs(t - med) for t in times))
        d = med + self.k * mad
        return d if self.cap is None else min(d, self.cap)


def _median(xs) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


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
    if getattr(cfg, "model", None):  # a user's model serves any client j: no shards to cut
        return make_run_task(cfg, n), n
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


def client_links(cfg: RunConfig, n: int) -> list[tuple[str, LinkProfile]]:
    """(description, profile) of every client, from link / link_mix / link_trace (default: unlimited),
    then the per-client `links` table ({client id: spec}) on top.

    link_mix: client j draws u ~ U[0,1) from (seed, j) and takes the preset whose cumulative weight
    first exceeds u. link_trace: the row of client j; clients without a row take row j mod rows.
    """
    out = _base_links(cfg, n)
    for key, spec in (getattr(cfg, "links", None) or {}).items():
        j = int(str(key))
        if not 0 <= j < n:
            raise ConfigError(f"links: client {j} is not one of the run's clients 0..{n - 1}")
        out[j] = (spec.strip().lower(), parse_link(spec))
    return out


def _base_links(cfg: RunConfig, n: int) -> list[tuple[str, LinkProfile]]:
    if cfg.link_trace is not None:
        rows = load_link_trace(cfg.link_trace)
        by_id = {c: p for c, p in rows}
        out = []
        for j in range(n):
            p = by_id.get(j, rows[j % len(rows)][1])
            out.append((p.to_spec(), p))
        return out
    if cfg.link_mix is not None:
        mix = parse_link_mix(cfg.link_mix)
        out = []
        for j in range(n):
            u = random.Random(derive_seed("link-mix", cfg.seed, j)).random()
            acc = 0.0
            chosen = mix[-1]
            for item in mix:
                acc += item[2]
                if u < acc:
                    chosen = item
                    break
            out.append((chosen[0], chosen[1]))
        return out
    p = parse_link(cfg.link) if cfg.link is not None else PRESETS["none"]
    name = cfg.link.strip().lower() if cfg.link is not None else "none"
    return [(name, p) for _ in range(n)]


LINK_KEYS = ("link", "link_mix", "link_trace")  # the settings that give clients links


def has_links(cfg: RunConfig) -> bool:
    return any(getattr(cfg, k, None) is not None for k in LINK_KEYS) or bool(getattr(cfg, "links", None))



def task_setup(cfg: RunConfig, task=None):
    """(Setup, batch(j, k)) of a run, as every driver builds it: with cohorts (`runs_cohorts`) the task is cut
    for the n clients as `simulate` cuts it (`task_for_clients`) and client j's batch of round k is
    `client_batch`; else task.batch(j, k) of the --workers shards. `task`: one built before (clients
    hosted in one process share it)."""
    from .model import Setup  # lazy: common.model loads torch

    if not runs_cohorts(cfg):
        setup = Setup(cfg, task=task)
        return setup, setup.task.batch
    n = federation_size(cfg)
    shards = None
    if task is None:
        task, shards = task_for_clients(cfg, n)
    setup = Setup(cfg, task=task)
    shards = shards or task.n_workers
    return setup, lambda j, k: client_batch(task, shards, n, j, k)

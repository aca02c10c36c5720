"""Federated mode of `efmuon simulate`: n clients, partial participation, per-client links, a simulated clock.

It drives the same `ServerState` / `WorkerState` objects as the synchronous simulator and the
service (DESIGN.md §1, §6); nothing of the algorithm is re-implemented here.

Semantics
---------
* **Clients.** n = `clients` (else `workers`). Each round k, m = max(1, round(participation * n))
  clients are sampled without replacement, deterministically from (seed, k). Only they compute.
* **Partial participation.** A skipped client keeps its M_j and G_j. The server's G stays the mean
  over all n estimators: `ServerState.aggregate` adds (1/n) sum_{j sampled} R_j.
* **Catch-up.** A client last in sync at round s (W_s) that is sampled in round k > s + 1 first
  catches up to W_{k-1} by whichever costs fewer bytes: replaying the missed downlink frames
  S_{s+1} .. S_{k-1} (the sum of their lengths) or one full W (identity fp32 frames: 4 * numel plus
  the frame headers). Then it gets S_k like everyone else. Catch-up bytes are counted in the down
  direction and also reported as `catchup` in the round entry. Replaying the same frames in the
  same order gives W bits identical to the server's, so the simulator does not keep a W per
  client: a sampled client starts from a copy of the server's W_{k-1} (`exact_w=True` keeps a real
  W per client and really replays, for tests).
* **Stragglers.** With a `deadline`, a sampled client whose simulated time exceeds it is dropped
  from the round: its uplink is discarded and it keeps its M_j and G_j (it computes on copies). It
  did receive the downlink (bytes counted, W in sync at k). The round then lasts `deadline`: the
  server has to wait that long to know.
* **Data.** Client j trains on shard j mod S of the task, where S = n if the task can be cut into n
  shards, else the largest S it supports (digits: ~179). With S < n, the clients sharing a shard
  draw different batches: client j's batch of round k is `task.batch(j mod S, k * ceil(n/S) + j // S)`.
  With S == n that is `task.batch(j, k)`, exactly the synchronous simulator's batches.
* **Initialisation.** As in the synchronous simulator: every client gets W_0 uncompressed at join
  (identity frames), and with init='grad' sends g_j(X_0) uncompressed once.

Simulated clock
---------------
A sampled client's time in round k is

    compute * speed_j + (delay + jitter + down_bytes*8/down_bps + rto*lost) + (same for up)

where `compute` is the measured wall time of that client's gradient and uplink encoding in this
process (or `compute_seconds` when given: use it for runs whose straggler drops must be
reproducible bit for bit), `speed_j` the client's compute-scale factor, jitter a uniform draw in
[-jitter, jitter] per transfer (clamped so the transfer time stays >= 0), and `lost` the number of
64 KiB segments lost (probability `loss` each), each costing an RTO of max(200 ms, 2*delay) -- the
model of `CountingRelay`. Unlimited rates (None) transfer in zero time. The round's simulated time
is the max over the clients that made it (or `deadline` when someone was dropped); the server's own
compute is not counted. `sim_time` is cumulative and starts with the join exchange
(`sim_join_seconds`: W_0 down, g_j(X_0) up, over every client's link).
Per client, `summary.links[j].up|down` gives `configured_bps`, `achieved_bps` (bytes*8 / the
simulated transfer seconds, latency included), `bytes` and `seconds`.
"""
from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from efmuon.common.algorithm import ServerState, WorkerState, params_sha256
from efmuon.common.compress import parse_spec
from efmuon.common.config import RunConfig
from efmuon.common.errors import ConfigError
from efmuon.common.links import PRESETS, LinkProfile, parse_link
from efmuon.common.report import Report, human_bytes
from efmuon.common.tasks import derive_seed, make_task

FEDERATED_KEYS = ("clients", "participation", "link", "link_mix", "link_trace", "deadline", "compute_scale",
                  "compute_seconds")
LOSS_SEGMENT = 64 * 1024
MIN_RTO = 0.200
INIT_CHUNK = 256  # join: aggregate the initial g_j(X_0) in chunks of this many clients


def is_federated(cfg: RunConfig) -> bool:
    """True when any federated setting is given: `simulate` then runs this module's loop."""
    return any(getattr(cfg, k) is not None for k in FEDERATED_KEYS) or bool(getattr(cfg, "links", None))


# ---------------------------------------------------------------------------- parsing

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


# ---------------------------------------------------------------------------- the simulator

@dataclass
class _LinkStats:
    up_bytes: int = 0
    up_seconds: float = 0.0
    down_bytes: int = 0
    down_seconds: float = 0.0
    rounds: int = 0  # rounds sampled in
    dropped: int = 0  # of which dropped as a straggler
    catchup: int = 0  # catch-up bytes received


class FederatedSim:
    """n clients, partial participation, catch-up, stragglers and a simulated clock (module docstring).

    `exact_w=True` keeps a real W per client and replays missed frames for real (tests; memory heavy).
    `server_estimators` keeps the server's per-client G_j copies (default: only for n <= 64; the
    clients' own G_j are identical bits and are what the simulator keeps).
    Use `join()` once, then `round(k)` for k = 1, 2, ... (optionally with an explicit client list).
    """

    def __init__(self, cfg: RunConfig, exact_w: bool = False, server_estimators: bool | None = None,
                 device: str | torch.device = "cpu", stream=None, quiet: bool = True):
        from efmuon.common.simulate import Setup
        from efmuon.common.training import configure_torch

        configure_torch(cfg.threads)
        self.n = int(cfg.clients or cfg.workers)
        task, self.shards = task_for_clients(cfg, self.n)
        self.setup = setup = Setup(cfg, task=task)
        self.cfg = cfg = setup.cfg
        self.task = task
        self.reps = -(-self.n // self.shards)
        self.m = clients_per_round(cfg.participation, self.n)
        self.exact_w = exact_w
        if server_estimators is None:
            server_estimators = self.n <= 64
        self.device = torch.device(device)
        self.server = ServerState(setup.params, setup.specs, cfg, self.n, device=self.device,
                                  keep_estimators=server_estimators)
        self.workers = []
        for j in range(self.n):
            ws = WorkerState(setup.params, setup.specs, cfg, j, device=self.device)
            if not exact_w:
                ws.W = None  # after catch-up W equals the server's: not kept per client (see round())
            self.workers.append(ws)
        self.model = task.build_model().to(self.device)
        self.links = client_links(cfg, self.n)
        self.speed = compute_factors(cfg.compute_scale, self.n, cfg.seed)
        self.stats = [_LinkStats() for _ in range(self.n)]
        self.last_sync = [0] * self.n  # the round whose W the client holds
        self.cum_frames = [0]  # cum_frames[k] = sum_{i <= k} len(S_i) (one client's copy)
        self.history: list[list[bytes]] = []  # downlink frames per round (exact_w only)
        ident = parse_spec("identity")
        self.full_w_bytes = sum(ident.frame_size(s.shape) for s in setup.specs)
        self.sim_time = 0.0
        self.sim_join_seconds = 0.0
        self.uncompressed = {"up": 0, "down": 0}
        self.stream, self.quiet = stream, quiet

    # -- helpers
    def batch_of(self, j: int, k: int):
        return self.task.batch(j % self.shards, k * self.reps + j // self.shards)

    def _grads(self, j: int, k: int, W):
        from efmuon.common.training import gradients

        batch = self.batch_of(j, k)
        return gradients(self.model, W, lambda m: self.task.loss(m, batch))

    def _rng(self, what: str, k: int, j: int) -> random.Random:
        return random.Random(derive_seed("net", what, self.cfg.seed, k, j))

    def _compute_seconds(self, measured: float, j: int) -> float:
        base = measured if self.cfg.compute_seconds is None else float(self.cfg.compute_seconds)
        return base * self.speed[j]

    # -- join
    def join(self) -> dict:
        """W_0 down to every client (identity frames); with init='grad' g_j(X_0) up once. Returns init bytes."""
        cfg, full = self.cfg, self.full_w_bytes
        W0 = [w.clone() for w in self.server.W]
        up_total, seconds = 0, 0.0
        ups = {}
        for j in range(self.n):
            prof = self.links[j][1]
            rng = self._rng("join", 0, j)
            st = self.stats[j]
            t_down = transfer_seconds(prof, "down", full, rng)
            st.down_bytes += full
            st.down_seconds += t_down
            t = t_down
            if cfg.init == "grad":
                ws = self.workers[j]
                if not self.exact_w:
                    ws.W = W0  # read only here (init_uplink checks shapes against W)
                t0 = time.perf_counter()
                _, g = self._grads(j, 0, ws.W)
                frames = ws.init_uplink(g)
                measured = time.perf_counter() - t0
                if not self.exact_w:
                    ws.W = None
                nbytes = sum(len(f) for f in frames)
                ups[j] = frames
                if len(ups) >= INIT_CHUNK:  # bounded memory for many clients (one shot up to INIT_CHUNK)
                    self.server.aggregate(ups, init=True)
                    ups = {}
                t_up = transfer_seconds(prof, "up", nbytes, rng)
                st.up_bytes += nbytes
                st.up_seconds += t_up
                up_total += nbytes
                t += self._compute_seconds(measured, j) + t_up
            seconds = max(seconds, t)
        if ups:
            self.server.aggregate(ups, init=True)
        self.sim_join_seconds = seconds
        self.sim_time = seconds
        self.uncompressed["down"] += self.n * 4 * self.setup.numel
        if cfg.init == "grad":
            self.uncompressed["up"] += self.n * 4 * self.setup.numel
        return {"down": {"payload": self.n * full}, "up": {"payload": up_total}}

    # -- one round
    def round(self, k: int, sampled: Sequence[int] | None = None) -> dict:
        """Round k: server step, sampled clients catch up / compute / upload, drop stragglers, aggregate.

        Returns the round's figures (bytes, catch-up, sim seconds, per-client details).
        """
        if k != self.server.round + 1:
            raise ValueError(f"round {k} after round {self.server.round}")
        cfg, server = self.cfg, self.server
        sampled = sample_clients(cfg.seed, k, self.n, self.m) if sampled is None else sorted(set(sampled))
        prev_w = None if self.exact_w else [w.clone() for w in server.W]
        frames = server.step()
        flen = sum(len(f) for f in frames)
        self.cum_frames.append(self.cum_frames[-1] + flen)
        if self.exact_w:
            self.history.append(list(frames))
        numel4 = 4 * self.setup.numel
        ups, losses, clients = {}, [], {}
        up_total = down_total = catchup_total = 0
        times, dropped = [], []
        for j in sampled:
            ws, st, prof = self.workers[j], self.stats[j], self.links[j][1]
            s = self.last_sync[j]
            missed = k - 1 - s
            replay = self.cum_frames[k - 1] - self.cum_frames[s]
            catchup = min(replay, self.full_w_bytes) if missed > 0 else 0
            if self.exact_w:
                if missed > 0:  # replay the missed frames for real: identical bits to the server's W_{k-1}
                    for fr in self.history[s:k - 1]:
                        ws.apply_downlink(fr)
                if ws.round != k - 1:
                    raise AssertionError(f"client {j} holds W after {ws.round} downlinks, expected {k - 1}")
            else:
                ws.W = [w.clone() for w in prev_w]
                ws.round = k - 1
            ws.apply_downlink(frames)
            saved = None
            if cfg.deadline is not None:
                saved = ([m.clone() for m in ws.M], [g.clone() for g in ws.Gj],
                         None if ws.error is None else [e.clone() for e in ws.error])
            t0 = time.perf_counter()
            loss, g = self._grads(j, k, ws.W)
            up_frames = ws.make_uplink(g)
            measured = time.perf_counter() - t0
            if not self.exact_w:
                ws.W = None
            nup = sum(len(f) for f in up_frames)
            ndown = catchup + flen
            rng = self._rng("round", k, j)
            t_down = transfer_seconds(prof, "down", ndown, rng)
            t_up = transfer_seconds(prof, "up", nup, rng)
            t = self._compute_seconds(measured, j) + t_down + t_up
            late = cfg.deadline is not None and t > cfg.deadline
            st.rounds += 1
            st.down_bytes += ndown
            st.down_seconds += t_down
            st.catchup += catchup
            down_total += ndown
            catchup_total += catchup
            self.uncompressed["down"] += numel4 + (self.full_w_bytes if missed > 0 else 0)
            self.last_sync[j] = k
            if late:
                ws.M, ws.Gj, ws.error = saved  # a straggler keeps its state
                st.dropped += 1
                dropped.append(j)
            else:
                ups[j] = up_frames
                st.up_bytes += nup
                st.up_seconds += t_up
                up_total += nup
                losses.append(loss)
                times.append(t)
                self.uncompressed["up"] += numel4
            clients[str(j)] = {"up": {"payload": 0 if late else nup, "message": None, "wire": None},
                               "down": {"payload": ndown, "message": None, "wire": None},
                               "catchup": catchup, "sim_seconds": t, "dropped": late}
        server.aggregate(ups)
        sim_seconds = float(cfg.deadline) if dropped else max(times, default=0.0)
        self.sim_time += sim_seconds
        return {"bytes": {"up": {"payload": up_total, "message": None, "wire": None},
                          "down": {"payload": down_total, "message": None, "wire": None}},
                "catchup": catchup_total, "sim_seconds": sim_seconds, "sim_time": self.sim_time,
                "sampled": len(sampled), "dropped": dropped,
                "train_loss": (sum(losses) / len(losses)) if losses else None, "clients": clients}

    # -- report pieces
    def links_summary(self) -> dict:
        out = {}
        for j, (st, (desc, prof)) in enumerate(zip(self.stats, self.links)):
            def side(rate, nbytes, secs):
                return {"configured_bps": rate, "achieved_bps": (nbytes * 8.0 / secs) if secs > 0 else None,
                        "bytes": nbytes, "seconds": secs}
            out[str(j)] = {"profile": desc, "delay_s": prof.delay_s, "compute_scale": self.speed[j],
                           "rounds": st.rounds, "dropped": st.dropped, "catchup_bytes": st.catchup,
                           "up": side(prof.up_bps, st.up_bytes, st.up_seconds),
                           "down": side(prof.down_bps, st.down_bytes, st.down_seconds)}
        return out

    def client_estimators_mean(self) -> list[torch.Tensor]:
        """mean_j G_j over all n clients (the clients' own copies): what the server's G must equal."""
        acc = [torch.zeros_like(g) for g in self.server.G]
        for ws in self.workers:
            for a, g in zip(acc, ws.Gj):
                a.add_(g)
        return [a / self.n for a in acc]


def simulate_federated(cfg: RunConfig, quiet: bool = False, stream=None) -> dict:
    """`efmuon simulate` in federated mode; returns the report (DESIGN.md §8 plus federated fields)."""
    import sys

    from efmuon.common.simulate import eval_losses
    from efmuon.common.training import configure_torch, evaluate, resolve_device

    configure_torch(cfg.threads)
    out = stream or sys.stdout
    wall0 = time.perf_counter()
    sim = FederatedSim(cfg, device=resolve_device(cfg.device), stream=stream, quiet=quiet)
    cfg, setup, task, n = sim.cfg, sim.setup, sim.task, sim.n
    if not quiet:
        note = (f"federated: {n} clients, {sim.m} per round"
                + (f", deadline {cfg.deadline:g} s" if cfg.deadline is not None else "")
                + f", links: {_describe_links(sim.links)}")
        if sim.shards < n:
            note += (f"; task {cfg.task} has data for {sim.shards} shards: client j trains on shard "
                     f"j mod {sim.shards} with its own batches")
        print(note, file=out, flush=True)
    eval_model = task.build_model().to(sim.device)
    report = Report(cfg.to_dict(), transport=False, metrics_path=cfg.metrics, log_every=cfg.log_every,
                    total_rounds=cfg.rounds, stream=stream, quiet=quiet)
    initial_w, _ = eval_losses(setup, eval_model, sim.server.W, sim.server.X)
    report.add_init(sim.join())
    for k in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        r = sim.round(k)
        seconds = time.perf_counter() - t0
        loss_w = loss_x = val_w = None
        if k % cfg.eval_every == 0 or k == cfg.rounds:
            loss_w, loss_x = eval_losses(setup, eval_model, sim.server.W, sim.server.X)
            val_w = evaluate(eval_model, sim.server.W, task.eval_loss)
        report.add_round(k, loss_w, loss_x, seconds, r["bytes"], train_loss=r["train_loss"], val_loss_w=val_w,
                         sim_seconds=r["sim_seconds"], sim_time=r["sim_time"], catchup=r["catchup"],
                         sampled=r["sampled"], dropped=r["dropped"], clients=r["clients"])
    eval_w = evaluate(eval_model, sim.server.W, task.eval_loss)
    eval_x = evaluate(eval_model, sim.server.X, task.eval_loss)
    dropped = sum(st.dropped for st in sim.stats)
    report.finish(
        initial_loss=initial_w,
        eval_loss_w=eval_w,
        eval_loss_x=eval_x,
        f_star=getattr(task, "f_star", None),
        uncompressed_bytes=dict(sim.uncompressed),
        w_sha256=params_sha256(sim.server.W, setup.names),
        x_sha256=params_sha256(sim.server.X, setup.names),
        parameters=setup.numel,
        workers=n,
        sim_time=sim.sim_time,
        sim_join_seconds=sim.sim_join_seconds,
        federated={"clients": n, "per_round": sim.m, "participation": cfg.participation or 1.0,
                   "shards": sim.shards, "deadline": cfg.deadline, "dropped": dropped,
                   "catchup_bytes": sum(st.catchup for st in sim.stats),
                   "compute": "measured" if cfg.compute_seconds is None else cfg.compute_seconds,
                   "compute_scale": cfg.compute_scale or "1", "full_w_bytes": sim.full_w_bytes,
                   "wall_seconds": time.perf_counter() - wall0},
        links=sim.links_summary(),
        client_bytes={str(j): {"up": {"payload": st.up_bytes}, "down": {"payload": st.down_bytes}}
                      for j, st in enumerate(sim.stats)},
    )
    if not quiet:
        report.print_summary()
        print(f"simulated time {sim.sim_time:.2f} s (join {sim.sim_join_seconds:.2f} s)   "
              f"stragglers dropped {dropped}   catch-up bytes {human_bytes(report.summary['federated']['catchup_bytes'])}",
              file=out, flush=True)
    return _finish_outputs(report, cfg, quiet, out)


def _describe_links(links) -> str:
    counts: dict[str, int] = {}
    for desc, _ in links:
        counts[desc] = counts.get(desc, 0) + 1
    items = sorted(counts.items(), key=lambda t: -t[1])
    text = ", ".join(f"{d} x{c}" for d, c in items[:5])
    return text + (f", ... ({len(items)} profiles)" if len(items) > 5 else "")


def _finish_outputs(report: Report, cfg: RunConfig, quiet: bool, out) -> dict:
    from efmuon.common.simulate import write_outputs

    return write_outputs(report, cfg, quiet, out)

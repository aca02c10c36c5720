"""Federated mode of `efmuon simulate`: n clients, partial participation, per-client links, a simulated clock.

It drives the same `ServerState` / `WorkerState` objects as the synchronous simulator and the
service (docs/design.md §1, §6); nothing of the algorithm is re-implemented here.

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

import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..common.algorithm import ServerState, WorkerState, params_sha256
from ..common.compress import parse_spec
from ..common.config import RunConfig
from ..common.federation import (
    AdaptiveDeadline,
    client_batch,
    clients_per_round,
    compute_factors,
    sample_clients,
    task_for_clients,
    transfer_seconds,
)
from ..common.federation import client_links
from ..common.model import Setup, eval_losses, evaluate, gradients
from ..common.outputs import write_outputs
from ..common.report import Report, human_bytes
from ..common.runtime import configure_torch, resolve_device
from ..common.tasks import derive_seed

INIT_CHUNK = 256  # join: aggregate the initial g_j(X_0) in chunks of this many clients


@dataclass
class _LinkStats:
    up_bytes: int = 0
    up_seconds: float = 0.0
    down_bytes: int = 0
    down_seconds: float = 0.0
    rounds: int = 0  # rounds sampled in
    dropped: int = 0  # of which dropped as a straggler
    catchup: int = 0  # catch-up bytes received


@dataclass
class _ClientRound:
    """What one sampled client did in a round (`FederatedSim._client_round`)."""

    frames: list[bytes]  # its uplink (discarded when late)
    loss: float
    nup: int  # uplink bytes
    ndown: int  # downlink bytes, catch-up included
    catchup: int
    seconds: float  # simulated time
    late: bool  # dropped as a straggler


class FederatedSim:
    """n clients, partial participation, catch-up, stragglers and a simulated clock (module docstring).

    `exact_w=True` keeps a real W per client and replays missed frames for real (tests; memory heavy).
    `server_estimators` keeps the server's per-client G_j copies (default: only for n <= 64; the
    clients' own G_j are identical bits and are what the simulator keeps).
    Use `join()` once, then `round(k)` for k = 1, 2, ... (optionally with an explicit client list).
    """

    def __init__(self, cfg: RunConfig, exact_w: bool = False, server_estimators: bool | None = None,
                 device: str | torch.device = "cpu", stream=None, quiet: bool = True):
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
        self.deadlines = AdaptiveDeadline(cfg.adaptive_deadline, cfg.deadline)
        self.deadline = cfg.deadline  # this round's (adaptive: from the clients' recent times)
        self.uncompressed = {"up": 0, "down": 0}
        self.stream, self.quiet = stream, quiet

    # -- helpers
    def batch_of(self, j: int, k: int):
        return client_batch(self.task, self.shards, self.n, j, k)

    def _grads(self, j: int, k: int, W):
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
        ups, init_losses = {}, {}
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
                init_losses[j], g = self._grads(j, 0, ws.W)
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
        self.server.observe_losses(init_losses, init=True)
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
        self.deadline = self.deadlines.current()
        prev_w = None if self.exact_w else [w.clone() for w in server.W]
        frames = server.step()
        flen = sum(len(f) for f in frames)
        self.cum_frames.append(self.cum_frames[-1] + flen)
        if self.exact_w:
            self.history.append(list(frames))
        ups, losses, clients, by_client = {}, [], {}, {}
        up_total = down_total = catchup_total = 0
        times, dropped = [], []
        for j in sampled:
            c = self._client_round(j, k, frames, flen, prev_w)
            down_total += c.ndown
            catchup_total += c.catchup
            if c.late:
                dropped.append(j)
            else:
                ups[j] = c.frames
                up_total += c.nup
                losses.append(c.loss)
                by_client[j] = c.loss
                times.append(c.seconds)
            clients[str(j)] = {"up": {"payload": 0 if c.late else c.nup, "message": None, "wire": None},
                               "down": {"payload": c.ndown, "message": None, "wire": None},
                               "catchup": c.catchup, "sim_seconds": c.seconds, "dropped": c.late}
        server.aggregate(ups)
        server.observe_losses(by_client)
        self.deadlines.add_round(times)
        sim_seconds = float(self.deadline) if dropped else max(times, default=0.0)
        self.sim_time += sim_seconds
        return {"bytes": {"up": {"payload": up_total, "message": None, "wire": None},
                          "down": {"payload": down_total, "message": None, "wire": None}},
                "catchup": catchup_total, "sim_seconds": sim_seconds, "sim_time": self.sim_time,
                **({"deadline": self.deadline} if cfg.adaptive_deadline is not None else {}),
                "sampled": len(sampled), "dropped": dropped,
                "train_loss": (sum(losses) / len(losses)) if losses else None, "clients": clients}

    def _client_round(self, j: int, k: int, frames: list[bytes], flen: int, prev_w) -> _ClientRound:
        """Sampled client j in round k: catch up to W_{k-1}, apply S_k, compute and encode its
        uplink, time it on its link; a straggler (past the deadline) gets its M_j, G_j back."""
        ws, st, prof = self.workers[j], self.stats[j], self.links[j][1]
        missed = k - 1 - self.last_sync[j]
        catchup = self._catch_up(j, k, prev_w)
        ws.apply_downlink(frames)
        saved = None
        if self.deadline is not None:
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
        late = self.deadline is not None and t > self.deadline
        st.rounds += 1
        st.down_bytes += ndown
        st.down_seconds += t_down
        st.catchup += catchup
        numel4 = 4 * self.setup.numel
        self.uncompressed["down"] += numel4 + (self.full_w_bytes if missed > 0 else 0)
        self.last_sync[j] = k
        if late:
            ws.M, ws.Gj, ws.error = saved  # a straggler keeps its state
            st.dropped += 1
        else:
            st.up_bytes += nup
            st.up_seconds += t_up
            self.uncompressed["up"] += numel4
        return _ClientRound(up_frames, loss, nup, ndown, catchup, t, late)

    def _catch_up(self, j: int, k: int, prev_w) -> int:
        """Bring client j to W_{k-1} (module docstring, catch-up); returns the bytes that costs: the
        missed frames or one full W, whichever is fewer (0 when it missed nothing)."""
        ws, s = self.workers[j], self.last_sync[j]
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
        return catchup

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
    """`efmuon simulate` in federated mode; returns the report (docs/design.md §8 plus federated fields)."""
    configure_torch(cfg.threads)
    out = stream or sys.stdout
    wall0 = time.perf_counter()
    sim = FederatedSim(cfg, device=resolve_device(cfg.device), stream=stream, quiet=quiet)
    cfg, setup, task = sim.cfg, sim.setup, sim.task
    if not quiet:
        print(_announce(sim), file=out, flush=True)
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
                         sampled=r["sampled"], dropped=r["dropped"], clients=r["clients"],
                         **({"deadline": r["deadline"]} if "deadline" in r else {}))
    dropped = _finish(report, sim, eval_model, initial_w, wall0)
    if not quiet:
        report.print_summary()
        print(f"simulated time {sim.sim_time:.2f} s (join {sim.sim_join_seconds:.2f} s)   "
              f"stragglers dropped {dropped}   catch-up bytes {human_bytes(report.summary['federated']['catchup_bytes'])}",
              file=out, flush=True)
    return write_outputs(report, cfg, quiet, out)


def _announce(sim: FederatedSim) -> str:
    """The line a federated run starts with: clients, cohort, deadline, links, shards."""
    cfg, n = sim.cfg, sim.n
    note = (f"federated: {n} clients, {sim.m} per round"
            + (f", deadline {cfg.deadline:g} s" if cfg.deadline is not None else "")
            + f", links: {_describe_links(sim.links)}")
    if sim.shards < n:
        note += (f"; task {cfg.task} has data for {sim.shards} shards: client j trains on shard "
                 f"j mod {sim.shards} with its own batches")
    return note


def _finish(report: Report, sim: FederatedSim, eval_model, initial_w: float, wall0: float) -> int:
    """The run's summary (final losses, hashes, the federated and per-link figures); returns the
    number of straggler drops."""
    cfg, setup, task, n = sim.cfg, sim.setup, sim.task, sim.n
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
                   "shards": sim.shards, "deadline": cfg.deadline, "adaptive_deadline": cfg.adaptive_deadline,
                   "dropped": dropped,
                   "catchup_bytes": sum(st.catchup for st in sim.stats),
                   "compute": "measured" if cfg.compute_seconds is None else cfg.compute_seconds,
                   "compute_scale": cfg.compute_scale or "1", "full_w_bytes": sim.full_w_bytes,
                   "wall_seconds": time.perf_counter() - wall0},
        links=sim.links_summary(),
        client_bytes={str(j): {"up": {"payload": st.up_bytes}, "down": {"payload": st.down_bytes}}
                      for j, st in enumerate(sim.stats)},
    )
    return dropped


def _describe_links(links) -> str:
    counts: dict[str, int] = {}
    for desc, _ in links:
        counts[desc] = counts.get(desc, 0) + 1
    items = sorted(counts.items(), key=lambda t: -t[1])
    text = ", ".join(f"{d} x{c}" for d, c in items[:5])
    return text + (f", ... ({len(items)} profiles)" if len(items) > 5 else "")

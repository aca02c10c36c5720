"""Synchronous mode of `efmuon simulate`: n virtual workers in lock step, in one process, no transport.

Every round the server steps, each worker applies the downlink, computes its gradient on its
batch and sends its uplink, and the server aggregates: the same `ServerState` / `WorkerState`
calls as the networked service, in the same order, so a simulated run and `efmuon run` end with
the same `w_sha256`. Bytes are the frames' payload (no message or wire level here). Settings of
the federated mode (clients, participation, links, ...) hand the run over to `simulate_federated`.
"""
from __future__ import annotations

import time

from ..common.algorithm import ServerState, WorkerState, params_sha256
from ..common.config import RunConfig
from ..common.federation import is_federated
from ..common.model import Setup, eval_losses, evaluate, gradients
from ..common.outputs import write_outputs
from ..common.report import Report
from ..common.runtime import configure_torch, resolve_device
from .federated import simulate_federated


class SyncSim:
    """The n workers, their models and the server of one synchronous run. `join()` once, then
    `round(k)` for k = 1, 2, ...; `per_client` accumulates each worker's payload bytes."""

    def __init__(self, cfg: RunConfig):
        self.setup = setup = Setup(cfg)
        self.cfg = cfg = setup.cfg
        self.task = setup.task
        device = resolve_device(cfg.device)
        self.n = n = cfg.workers
        self.server = ServerState(setup.params, setup.specs, cfg, n, device=device)
        self.workers = [WorkerState(setup.params, setup.specs, cfg, j, device=device) for j in range(n)]
        self.models = [setup.task.build_model().to(device) for _ in range(n)]
        self.eval_model = setup.task.build_model().to(device)
        self.full = setup.uncompressed_round_bytes()
        self.per_client = {str(j): {"up": {"payload": 0}, "down": {"payload": 0}} for j in range(n)}

    def grads_of(self, j: int, round_: int):
        batch = self.task.batch(j, round_)
        return gradients(self.models[j], self.workers[j].W, lambda m: self.task.loss(m, batch))

    def join(self) -> dict:
        """W = X = X_0 goes down uncompressed to everyone; 'grad' init sends g_j(X_0) up once.
        Returns the bytes of that exchange."""
        n, full = self.n, self.full
        init = {"down": {"payload": n * full}, "up": {"payload": 0}}
        if self.cfg.init == "grad":
            ups, losses = {}, {}
            for j in range(n):
                losses[j], g = self.grads_of(j, 0)
                ups[j] = self.workers[j].init_uplink(g)
            self.server.aggregate(ups, init=True)
            self.server.observe_losses(losses, init=True)
            init["up"]["payload"] = sum(sum(len(f) for f in fr) for fr in ups.values())
            for j, fr in ups.items():
                self.per_client[str(j)]["up"]["payload"] += sum(len(f) for f in fr)
        for j in range(n):
            self.per_client[str(j)]["down"]["payload"] += full
        return init

    def round(self, k: int) -> tuple[float, dict, float]:
        """Round k: server step, every worker applies the downlink, computes and uploads; aggregate.
        Returns (wall seconds of the step-to-aggregate, the round's bytes, the mean training loss)."""
        t0 = time.perf_counter()
        frames = self.server.step()
        down = sum(len(f) for f in frames)
        ups, losses = {}, []
        for j in range(self.n):
            self.workers[j].apply_downlink(frames)
            loss, g = self.grads_of(j, k)
            losses.append(loss)
            ups[j] = self.workers[j].make_uplink(g)
        self.server.aggregate(ups)
        self.server.observe_losses(dict(enumerate(losses)))
        seconds = time.perf_counter() - t0
        for j, fr in ups.items():
            self.per_client[str(j)]["up"]["payload"] += sum(len(f) for f in fr)
            self.per_client[str(j)]["down"]["payload"] += down
        up = sum(sum(len(f) for f in fr) for fr in ups.values())
        nbytes = {"up": {"payload": up, "message": None, "wire": None},
                  "down": {"payload": self.n * down, "message": None, "wire": None}}
        return seconds, nbytes, sum(losses) / len(losses)


def simulate(cfg: RunConfig, quiet: bool = False, stream=None) -> dict:
    """`efmuon simulate`: run `cfg` in process and return the report (written where `cfg` says)."""
    if is_federated(cfg):
        return simulate_federated(cfg, quiet=quiet, stream=stream)
    configure_torch(cfg.threads)
    sim = SyncSim(cfg)
    cfg, setup, task, server, eval_model = sim.cfg, sim.setup, sim.task, sim.server, sim.eval_model
    report = Report(cfg.to_dict(), transport=False, metrics_path=cfg.metrics, log_every=cfg.log_every,
                    total_rounds=cfg.rounds, stream=stream, quiet=quiet)
    initial_w, _ = eval_losses(setup, eval_model, server.W, server.X)
    report.add_init(sim.join())
    for k in range(1, cfg.rounds + 1):
        seconds, nbytes, train_loss = sim.round(k)
        loss_w = loss_x = val_w = None
        if k % cfg.eval_every == 0 or k == cfg.rounds:
            loss_w, loss_x = eval_losses(setup, eval_model, server.W, server.X)
            val_w = evaluate(eval_model, server.W, task.eval_loss)
        report.add_round(k, loss_w, loss_x, seconds, nbytes, train_loss=train_loss, val_loss_w=val_w)
    _finish(report, sim, initial_w)
    if not quiet:
        report.print_summary()
    return write_outputs(report, cfg, quiet, stream)


def _finish(report: Report, sim: SyncSim, initial_w: float) -> None:
    """The run's summary: final losses at W and X, the uncompressed baseline, the parameter hashes."""
    cfg, setup, task, server, n, full = sim.cfg, sim.setup, sim.task, sim.server, sim.n, sim.full
    eval_w = evaluate(sim.eval_model, server.W, task.eval_loss)
    eval_x = evaluate(sim.eval_model, server.X, task.eval_loss)
    rounds_total = cfg.rounds
    report.finish(
        initial_loss=initial_w,
        eval_loss_w=eval_w,
        eval_loss_x=eval_x,
        f_star=getattr(task, "f_star", None),
        uncompressed_bytes={"up": n * full * (rounds_total + (1 if cfg.init == "grad" else 0)),
                            "down": n * full * (rounds_total + 1)},
        w_sha256=params_sha256(server.W, setup.names),
        x_sha256=params_sha256(server.X, setup.names),
        parameters=setup.numel,
        workers=n,
        client_bytes=sim.per_client,
    )

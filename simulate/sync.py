"""TODO docstring"""
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


def simulate(cfg: RunConfig, quiet: bool = False, stream=None) -> dict:

    if is_federated(cfg):

        return simulate_federated(cfg, quiet=quiet, stream=stream)
    configure_torch(cfg.threads)
    setup = Setup(cfg)
    cfg = setup.cfg
    device = resolve_device(cfg.device)
    n = cfg.workers
    server = ServerState(setup.params, setup.specs, cfg, n, device=device)
    workers = [WorkerState(setup.params, setup.specs, cfg, j, device=device) for j in range(n)]
    models = [setup.task.build_model().to(device) for _ in range(n)]
    eval_model = setup.task.build_model().to(device)
    report = Report(cfg.to_dict(), transport=False, metrics_path=cfg.metrics, log_every=cfg.log_every,
                    total_rounds=cfg.rounds, stream=stream, quiet=quiet)
    full = setup.uncompressed_round_bytes()
    task = setup.task

    def grads_of(j: int, round_: int):
        batch = task.batch(j, round_)
        return gradients(models[j], workers[j].W, lambda m: task.loss(m, batch))

    per_client = {str(j): {"up": {"payload": 0}, "down": {"payload": 0}} for j in range(n)}
    initial_w, _ = eval_losses(setup, eval_model, server.W, server.X)
    # Join: W = X = X_0 goes down uncompressed to everyone; 'grad' init sends g_j(X_0) up once.
    init = {"down": {"payload": n * full}, "up": {"payload": 0}}
    if cfg.init == "grad":
        ups = {}
        for j in range(n):
            _, g = grads_of(j, 0)
            ups[j] = workers[j].init_uplink(g)
        server.aggregate(ups, init=True)
        init["up"]["payload"] = sum(sum(len(f) for f in fr) for fr in ups.values())
        for j, fr in ups.items():
            per_client[str(j)]["up"]["payload"] += sum(len(f) for f in fr)
    for j in range(n):
        per_client[str(j)]["down"]["payload"] += full
    report.add_init(init)

    for k in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        frames = server.step()
        down = sum(len(f) for f in frames)
        ups, losses = {}, []
        for j in range(n):
            workers[j].apply_downlink(frames)
            loss, g = grads_of(j, k)
            losses.append(loss)
            ups[j] = workers[j].make_uplink(g)
        server.aggregate(ups)
        seconds = time.perf_counter() - t0
        for j, fr in ups.items():
            per_client[str(j)]["up"]["payload"] += sum(len(f) for f in fr)
            per_client[str(j)]["down"]["payload"] += down
        up = sum(sum(len(f) for f in fr) for fr in ups.values())
        loss_w = loss_x = val_w = None
        if k % cfg.eval_every == 0 or k == cfg.rounds:
            loss_w, loss_x = eval_losses(setup, eval_model, server.W, server.X)
            val_w = evaluate(eval_model, server.W, task.eval_loss)
        report.add_round(k, loss_w, loss_x, seconds,
                         {"up": {"payload": up, "message": None, "wire": None},
                          "down": {"payload": n * down, "message": None, "wire": None}},
                         train_loss=sum(losses) / len(losses), val_loss_w=val_w)

    eval_w = evaluate(eval_model, server.W, task.eval_loss)
    eval_x = evaluate(eval_model, server.X, task.eval_loss)
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
        client_bytes=per_client,
    )
    if not quiet:
        report.print_summary()
    return write_outputs(report, cfg, quiet, stream)

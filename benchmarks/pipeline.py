"""`efmuon bench pipeline`: the round time of a real networked run (`run_local`: the server here, worker
processes on 127.0.0.1) with and without `--pipeline`, interleaved, and a DDP step of the same model
(gloo over 127.0.0.1, a plain all-reduce of every gradient, then an SGD step) as the baseline issue 15
names; the larger model also over an emulated 200 Mbit/s link (the DDP step stays on loopback).
Round time: the median of the report's `rounds[k].seconds` (k >= 2: the step that made S_k, the
downlink, the workers' gradients and uplinks), so evaluation is outside it (`--eval-every` = rounds)."""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..common.config import RunConfig
from ..common.tasks.factory import make_task
from ..server.local import run_local
from ..server.options import ServerOptions
from .harness import bench, by_level, goal, table
from .proc import free_port

# the models: gpt-char as the task ships it, and a wider, deeper one
MODELS = {"gpt-char": {}, "gpt-char-d256x4": {"d_model": 256, "n_layers": 4}}
# each (model, link): loopback as the issue asks, and the larger model over an emulated 200 Mbit/s link
# (the workers' relays), where the uplink takes long enough for the server's work to hide behind it
# (the third element: --lmo-threads, 0 = automatic: every core for the larger model's Newton-Schulz, which
# then competes with the receive and the workers during the overlap; 1 leaves them a core)
CASES = [("gpt-char", None, 0), ("gpt-char-d256x4", None, 0), ("gpt-char-d256x4", None, 1),
         ("gpt-char-d256x4", "up=200mbit,down=200mbit", 0)]


def _round_s(report: dict) -> float:
    secs = [r["seconds"] for r in report["rounds"][1:] if r.get("seconds") is not None]
    return statistics.median(secs)


def _ddp_rank(rank: int, world: int, port: int, opts: dict, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    task = make_task("gpt-char", world, 0, **opts)
    model = task.build_model()
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        task.loss(model, task.batch(rank, k)).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.01)
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as fh:
            fh.write(repr(statistics.median(times[1:] or times)))


def ddp_step_s(opts: dict, world: int, steps: int) -> float:
    """Median seconds of one DDP step (forward, backward, all-reduce, update) of `world` gloo processes."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="efmuon-bench-ddp-") as tmp:
        out = os.path.join(tmp, "median")
        mp.spawn(_ddp_rank, args=(world, port, opts, steps, out), nprocs=world, join=True)
        with open(out) as fh:
            return float(fh.read())


@bench("pipeline")
def bench_pipeline(level: str) -> dict:
    """Round time with and without --pipeline (run_local, interleaved) and a DDP (gloo) step of the same model."""
    cases, rounds, workers, repeat = by_level(level, full=(CASES, 12, 2, 3), quick=(CASES, 8, 2, 2),
                                              smoke=(CASES[:1], 3, 1, 1))
    rows = []
    ddps: dict[str, float] = {}
    for name, link, lmo_threads in cases:
        opts = MODELS[name]
        times: dict[bool, list[float]] = {False: [], True: []}
        walls: dict[bool, list[float]] = {False: [], True: []}
        shas: dict[bool, set] = {False: set(), True: set()}
        for _ in range(repeat):
            for pipelined in (False, True):  # interleaved: a noisy machine hits both alike
                cfg = RunConfig(task="gpt-char", workers=workers, rounds=rounds, uplink="identity",
                                downlink="identity", eval_every=rounds, task_options=dict(opts), link=link,
                                lmo_threads=lmo_threads)
                t0 = time.perf_counter()
                rep = run_local(cfg, quiet=True, options=ServerOptions(pipeline=pipelined))
                walls[pipelined].append(time.perf_counter() - t0)
                times[pipelined].append(_round_s(rep))
                shas[pipelined].add(rep["summary"]["w_sha256"])
        if name not in ddps:
            ddps[name] = ddp_step_s(opts, max(2, workers), by_level(level, full=20, quick=10, smoke=3))
        ddp = ddps[name]
        seq, pip = statistics.median(times[False]), statistics.median(times[True])
        row = {"model": name, "link": link or "loopback", "lmo_threads": lmo_threads or "auto", "params": sum(p.numel() for p in _model(opts).parameters()),
               "workers": workers,
               "rounds": rounds, "repeats": repeat, "round_s": seq, "round_s_pipeline": pip,
               "pipeline/sequential": pip / seq if seq else None, "run_wall_s": statistics.median(walls[False]),
               "run_wall_s_pipeline": statistics.median(walls[True]), "ddp_step_s": ddp,
               "sequential/ddp": seq / ddp if ddp else None, "pipeline/ddp": pip / ddp if ddp else None,
               "same_bits": shas[False] == shas[True] and len(shas[True]) == 1}
        print(f"  {name} ({link or 'loopback'}, lmo threads {lmo_threads or 'auto'}): round {seq:.4f} s, pipelined {pip:.4f} s, ddp step {ddp:.4f} s", flush=True)
        rows.append(row)
    goals = [goal(f"{r['model']} ({r['link']}, lmo threads {r['lmo_threads']}): pipelined round / sequential round", round(r["pipeline/sequential"], 3),
                  "<= 1.0 (not slower)", r["pipeline/sequential"] <= 1.0) for r in rows]
    goals += [goal(f"{r['model']} ({r['link']}, lmo threads {r['lmo_threads']}): same w_sha256 with and without --pipeline", r["same_bits"], "True",
                   r["same_bits"]) for r in rows]
    cols = ["model", "link", "lmo_threads", "params", "workers", "rounds", "repeats", "round_s", "round_s_pipeline", "pipeline/sequential",
            "run_wall_s", "run_wall_s_pipeline", "ddp_step_s", "sequential/ddp", "pipeline/ddp", "same_bits"]
    return {"result": rows, "goals": goals, "table": table(rows, cols)}


def _model(opts: dict):
    return make_task("gpt-char", 2, 0, **opts).build_model()

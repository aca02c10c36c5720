"""What `efmuon bench profile` runs and times (benchmarks.profile reads the figures): one efmuon run with
every hook on, and the DDP ranks of the same model.

efmuon: the real server (`build_coordinator`, `service.serve`) in the bench's own process with
`Coordinator.events` recording every event, and n real workers (`worker.task.for_task`, what `efmuon worker`
runs) with `Worker.trace` recording the time of each step of their loop: worker processes of
`python -m efmuon.benchmarks.service profile-worker JSON` (quick / full), or threads of this process
(smoke: seconds, no interpreter start-up). `time.perf_counter` is CLOCK_MONOTONIC on Linux, one clock
for every process of the machine, so the workers' marks and the server's events are comparable. After
the run, `step_split` times the step's parts on the run's final state (LMO alone, the whole step,
the reply's chunking), as `nodes.phase_profile` does: no hook brackets the LMO inside `ServerState.step`.

DDP: `ddp_rank` is one rank of torch DistributedDataParallel (gloo over 127.0.0.1) with the model, the
initial parameters, the batches and the optimizers (torch.optim.Muon + AdamW) of `benchmarks.ddp_peer`
(`setup_of`, `optimizers`), timing each step's batch, forward, backward (DDP's bucket hooks run the
allreduce during it, overlapped) and optimizer step.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import threading
import time

import torch

from ..common.config import RunConfig
from ..common.lmo import lmo_all
from ..server.app import build_coordinator
from ..server.plan import Plan
from ..server.service import serve
from ..worker.task import for_task
from .ddp_peer import optimizers, setup_of
from .proc import free_port, kill_leftovers, read_json, spawn


def traced_worker(server: str, client_id: int) -> dict:
    """One real worker of the server's task with `Worker.trace` on: {client_id, trace: [(step, t)]}."""
    w = for_task(server, client_id=client_id)
    marks: list[tuple[str, float]] = []
    w.trace = lambda step: marks.append((step, time.perf_counter()))
    w.run()
    return {"client_id": client_id, "trace": marks}


def worker_main(spec: dict) -> None:
    """`service profile-worker JSON`: `traced_worker`, its result as one JSON line."""
    print(json.dumps(traced_worker(spec["server"], int(spec["client_id"]))), flush=True)


SPLIT_SECONDS, MAX_SPLIT_REPEATS = 1.0, 50


def step_split(c, repeats: int) -> dict[str, float]:
    """The step's parts on the run's final state, `repeats` times after one warm-up (more, up to
    MAX_SPLIT_REPEATS, where that takes under SPLIT_SECONDS): the LMO of every block
    (`lmo_all` as `ServerState.step` calls it), then the whole step (LMO, update, downlink encode) and
    `Plan.build`; median seconds of each, and `lmo_fraction`: the median of each repeat's LMO / (step +
    build), at most 1 (the two are timed back to back, so both see the same load; alone, a busy machine can
    make the LMO slower than the step that holds it)."""
    st, cfg = c.state, c.cfg
    lmo, step, plan, frac = [], [], [], []
    rep, total = 0, repeats + 1
    while rep < total:
        t0 = time.perf_counter()
        for block in st.lmo_blocks():
            specs = [st.specs[i] for i in block]
            lmo_all([st.G[i] for i in block], specs, ns_steps=cfg.ns_steps, coeffs=cfg.ns_coeffs,
                    threads=st.block_threads(specs))
        t1 = time.perf_counter()
        frames = st.step()
        t2 = time.perf_counter()
        Plan.build(st.round + 1, frames)
        t3 = time.perf_counter()
        rep += 1
        if rep == 1:  # warm-up; a small model repeats for about a second (its ratio is noisy on a busy machine)
            total = max(total, min(MAX_SPLIT_REPEATS, 1 + int(SPLIT_SECONDS / max(t3 - t0, 1e-6))))
            continue
        lmo.append(t1 - t0)
        step.append(t2 - t1)
        plan.append(t3 - t2)
        frac.append(min(1.0, (t1 - t0) / (t3 - t1)) if t3 > t1 else 0.0)
    return {"lmo_s": statistics.median(lmo), "step_s": statistics.median(step), "plan_s": statistics.median(plan),
            "lmo_fraction": statistics.median(frac)}


def efmuon_run(cfg: RunConfig, processes: bool, split_repeats: int = 3) -> dict:
    """One traced run (module docstring): {events: [(what, round, t0, t1)], traces: {client: [(step, t)]},
    report, split (`step_split`)}."""
    torch_threads = torch.get_num_threads()  # build_coordinator (and worker threads) set the run's: restored below
    c = build_coordinator(cfg, quiet=True)
    events: list[tuple[str, int, float, float]] = []
    c.events = lambda what, k, t0, t1: events.append((what, k, t0, t1))
    procs: list = []
    threads: list = []

    def start(port: int) -> None:  # once the server listens; collected after the run (serve may return first)
        addr = f"127.0.0.1:{port}"
        for j in range(c.n):
            if processes:
                procs.append(spawn("profile-worker", {"server": addr, "client_id": j}))
            else:
                box: dict = {}
                t = threading.Thread(target=lambda j=j, box=box: box.update(out=traced_worker(addr, j)), daemon=True)
                t.start()
                threads.append((t, box))

    try:
        report = asyncio.run(serve(c, "127.0.0.1", 0, on_ready=start))
        if processes:
            outs = [read_json(p) for p in procs]
            for p in procs:
                p.wait(60)
        else:
            for t, _ in threads:
                t.join(60)
            if any("out" not in box for _, box in threads):
                raise RuntimeError("a worker thread failed (its traceback is printed above)")
            outs = [box["out"] for _, box in threads]
        split = step_split(c, split_repeats)
    finally:
        kill_leftovers(procs)
        c.executor.shutdown(wait=True)
        torch.set_num_threads(torch_threads)
    traces = {int(out["client_id"]): [tuple(m) for m in out["trace"]] for out in outs}
    return {"events": events, "traces": traces, "report": report, "split": split}


# ---------------------------------------------------------------------------------------------- DDP
DDP_PHASES = ("batch", "forward", "backward", "optimizer")


def ddp_rank(rank: int, world: int, port: int, options: dict, steps: int, out: str) -> None:
    """One DDP rank (module docstring); rank 0 writes {phase: [seconds per step]} to `out`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    setup = setup_of({"task": "gpt-char", "task_options": options, "world": world})
    task, model = setup.task, setup.model
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ddp = DDP(model)
        opts = optimizers(model, {})
        times: dict[str, list[float]] = {p: [] for p in DDP_PHASES}
        for k in range(1, steps + 1):
            t0 = time.perf_counter()
            batch = task.batch(rank, k)
            t1 = time.perf_counter()
            loss = task.loss(ddp, batch)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            for o in opts:
                o.step()
            for o in opts:
                o.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            for p, dt in zip(DDP_PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[p].append(dt)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(times, fh)


def ddp_profile(options: dict, world: int, steps: int) -> dict[str, list[float]]:
    """{phase: [seconds per step]} of rank 0 of `world` gloo ranks (processes; world 1: this process)."""
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="efmuon-bench-profile-") as tmp:
        out = os.path.join(tmp, "ddp.json")
        if world == 1:
            threads = torch.get_num_threads()
            try:
                ddp_rank(0, 1, port, options, steps, out)
            finally:
                torch.set_num_threads(threads)
        else:
            mp.spawn(ddp_rank, args=(world, port, options, steps, out), nprocs=world, join=True)
        with open(out) as fh:
            return json.load(fh)

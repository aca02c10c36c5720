"""The real server and worker processes the service benchmarks start (`service` modes serve, worker,
idle), on the synthetic model. They are observed only through the product's hooks: the server's
`Coordinator.events` and the worker's `Worker.trace`; nothing of the product is replaced.

serve    a real Coordinator + ParameterServer servicer. spec: params, workers, rounds, uplink,
         downlink, init; `shard` = [I, N]: shard I of N of the layers (docs/design.md §6.3), with
         `profile_gate`: it says it finished, then profiles once a line arrives on its stdin; `instrument`: record every Coordinator event (and the process's CPU seconds
         at each round's end); `rss_trace`: VmRSS after every event; `profile` = R: after the run,
         time R rounds' compute-thread phases by calling what a round calls (`phase_profile`).
worker   a real `efmuon.worker.Worker`; `rss_trace`: VmRSS after every step its trace reports.
idle     the framework baseline: the same imports, one torch op, nothing else.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import torch

from ..common.lmo import assign_norms, lmo_all
from ..common.runtime import configure_torch
from ..common.shards import shard_layers
from ..server.coordinator import Coordinator
from ..server.model import ServerModel
from ..server.plan import Plan
from ..server.service import serve
from ..worker.client import Worker
from .proc import cpu_seconds, proc_status
from .synthetic import SyntheticModule, synthetic_config, synthetic_layers, uplink_frames

PHASES = ("decode", "aggregate", "lmo", "step", "plan")


class EventRecorder:
    """A `Coordinator.events` callback: each event as (round, t0, t1) under its kind; at each
    'process' event also (round, the process's CPU seconds, t1) under 'cpu'; with `rss`, the
    process's VmRSS after every event under 'rss' as (round, kind, bytes)."""

    def __init__(self, rss: bool = False):
        self.timings: dict[str, list] = {"recv": [], "process": [], "record_down": [], "cpu": []}
        self.rss = rss

    def __call__(self, kind: str, round_: int, t0: float, t1: float) -> None:
        self.timings.setdefault(kind, []).append((round_, t0, t1))
        if kind == "process":
            self.timings["cpu"].append((round_, cpu_seconds(), t1))
        if self.rss:
            self.timings.setdefault("rss", []).append((round_, kind, proc_status()["VmRSS"]))


def phase_profile(c: Coordinator, frames: list[bytes], n: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each compute-thread phase of a round, `repeats` times, on the run's final state:
    n clients' uplinks `frames` decoded one after another (`ServerState.decode_uplink`, as
    `Coordinator.accept` runs it), applied (`ServerState.apply_decoded`), the LMO of every block (`lmo_all`, as `ServerState.step`
    calls it), the step itself (`ServerState.step`, LMO included) and its reply cut into chunk
    messages (`Plan.build`). The product's own functions, called directly: no hook brackets them."""
    st, cfg = c.state, c.cfg
    out: dict[str, list[float]] = {k: [] for k in PHASES}
    for _ in range(repeats):
        t = [time.perf_counter()]
        decoded = {j: st.decode_uplink(j, list(frames), False, True)[0] for j in range(n)}
        t.append(time.perf_counter())
        st.apply_decoded(decoded, True)
        t.append(time.perf_counter())
        for block in st.lmo_blocks():
            lmo_all([st.G[i] for i in block], [st.specs[i] for i in block], ns_steps=cfg.ns_steps,
                    coeffs=cfg.ns_coeffs, threads=cfg.lmo_threads or None)
        t.append(time.perf_counter())
        down = st.step()
        t.append(time.perf_counter())
        Plan.build(st.round + 1, down)
        t.append(time.perf_counter())
        del decoded, down
        for i, key in enumerate(PHASES):
            out[key].append(t[i + 1] - t[i])
    return out


def _server_model(layers, shard=None) -> ServerModel:
    """The synthetic model's ServerModel; `shard` = (index, count): that shard's layers (common.shards)."""
    model = SyntheticModule.build(layers)
    params = [p.detach() for p in model.parameters()]
    del model
    names, specs = [n for n, _ in layers], assign_norms(layers)
    if not shard:
        return ServerModel(names, params, specs)
    index, count = shard
    mine = shard_layers(specs, count)[index]
    return ServerModel([names[i] for i in mine], [params[i] for i in mine], [specs[i] for i in mine],
                       layer_ids=mine, shard=(index, count))


def serve_main(spec: dict) -> None:
    """A real Coordinator + servicer for a synthetic model (module docstring)."""
    configure_torch(spec.get("threads", 1))
    layers = synthetic_layers(spec["params"])
    cfg = synthetic_config(spec["workers"], spec["rounds"], spec["uplink"], spec["downlink"], spec["init"])
    server_model = _server_model(layers, spec.get("shard"))  # the Coordinator drops its parameters once copied
    recorder = EventRecorder(rss=bool(spec.get("rss_trace")))

    async def main() -> Coordinator:
        c = Coordinator(cfg, server_model, quiet=True, leave_timeout=60)
        if spec.get("instrument"):
            c.events = recorder

        def ready(port: int) -> None:
            print(json.dumps({"port": port, "pid": os.getpid(), **proc_status()}), flush=True)
        await serve(c, "127.0.0.1", 0, on_ready=ready)
        return c

    t0 = time.perf_counter()
    c = asyncio.run(main())
    done = {"seconds": time.perf_counter() - t0, "cpu_total": cpu_seconds(), **proc_status()}
    if spec.get("profile"):
        frames = uplink_frames(spec["params"], spec["uplink"])
        if spec.get("shard"):
            frames = [frames[i] for i in server_model.layer_ids]
        if spec.get("profile_gate"):  # shards of one machine: profile one at a time, when told (a line on stdin)
            print(json.dumps({"finished": True}), flush=True)
            sys.stdin.readline()
        recorder.timings["profile"] = phase_profile(c, frames, spec["workers"], int(spec["profile"]))
    print(json.dumps({"timings": recorder.timings, **done}), flush=True)


def worker_main(spec: dict) -> None:
    """A real efmuon Worker for the synthetic model (memory bench)."""
    layers = synthetic_layers(spec["params"])
    model = SyntheticModule.build(layers, seed=1)
    trace = []
    if spec.get("rss_trace"):  # RSS after each step of the worker's loop (attribution only)
        trace.append(("model built", proc_status()["VmRSS"]))
    w = Worker(model, SyntheticModule.loss, lambda k: None, server=spec["server"], client_id=spec["client_id"],
               measure_wire=spec.get("measure_wire", True))
    if spec.get("rss_trace"):
        w.trace = lambda step: trace.append((step, proc_status()["VmRSS"]))
    w.run()
    print(json.dumps({"client_id": spec["client_id"], "rss_trace": trace, **proc_status()}), flush=True)


def idle_main(spec: dict) -> None:
    """Framework baseline: the imports of a server and a worker, a torch op, nothing else."""
    torch.randn(16, 16) @ torch.randn(16, 16)
    print(json.dumps(proc_status()), flush=True)

"""The shared server harness: a tiny torch model and its data, the run config the service tests use,
a live grpc.aio server in the test's event loop on 127.0.0.1 (port 0) with `Worker`s in threads, and
the reference W of `efmuon simulate` driven in-process with the same model, data and order. Also a
fake clock for the relay's link shaping (fixture `relay_clock`), so shaping is checked by its
arithmetic, exactly, and not by wall-clock rates that a loaded machine cannot keep.

Test modules import these helpers from here (`from conftest import Harness, make_cfg, ...`), never
from one another.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
import types

import grpc
import pytest
import torch
from efmuon.common.algorithm import ServerState, WorkerState, params_sha256
from efmuon.common.config import RunConfig, resolve
from efmuon.common.model import gradients, model_specs, parameters_of
from efmuon.common.wire import chunking, protocol
from efmuon.server import service
from efmuon.server.coordinator import Coordinator
from efmuon.server.model import ServerModel
from efmuon.server.options import ServerOptions
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc
from efmuon.worker import Worker, shaping
from torch import nn

__all__ = ["Harness", "RelayClock", "batches_of", "efmuon_cli", "loss_fn", "make_cfg", "reference_w", "run_workers",
           "server_model", "tiny_model"]


def efmuon_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`efmuon ARGS` as a CompletedProcess. `simulate` runs in this process (`efmuon.cli.main`: no new interpreter
    and torch import, the suite's largest CPU cost); everything else (run, server, worker: processes and sockets
    are what they test) in a subprocess."""
    if args and args[0] == "simulate":
        from efmuon.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        return subprocess.CompletedProcess(["efmuon", *args], code, out.getvalue(), err.getvalue())
    return subprocess.run([sys.executable, "-m", "efmuon.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------- processes on 127.0.0.1
CLI = [sys.executable, "-m", "efmuon.cli"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log_path) -> subprocess.Popen:
    """`efmuon ARGS` as a process, its stdout and stderr appended to `log_path`, no stdin."""
    return subprocess.Popen(CLI + list(args), stdout=open(log_path, "a"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)


def finish(procs: list[subprocess.Popen], tmp, timeout: float = 120) -> list[int]:
    """The exit codes of `procs` (each waited for up to `timeout`); kills any still running and prints the tail
    of every *.log under `tmp` (pytest shows it when the test fails)."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        print("\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(tmp.glob("*.log"))))


def wait_round(port: int, at_least: int, proc: subprocess.Popen, log, timeout: float = 60) -> int:
    """Poll the server's Status until it collects round >= at_least; returns that round. Connects only once its
    log says it listens (no reconnect backoff), and fails with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while "listening on" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=protocol.CHANNEL_OPTIONS)
    stub = pb_grpc.ParameterServerStub(channel)
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                st = stub.Status(pb.StatusRequest(), timeout=1)
                if st.round >= at_least:
                    return st.round
            except grpc.RpcError:
                pass
            time.sleep(0.003)
    finally:
        channel.close()
    raise AssertionError(f"round {at_least} not reached: {log.read_text()[-3000:]}")


# ---------------------------------------------------------------------------- pytest-xdist scheduling
# Modules whose module-scoped fixture is a whole run (or several servers): one pytest-xdist worker takes
# each of them entire, so the fixture is built once. Every other test goes to whichever worker is free.
ONE_WORKER_MODULES = frozenset({"test_service_e2e.py", "test_export.py", "test_hangs.py", "test_simulate.py",
                                "test_resilience.py", "test_plots.py"})


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one pytest worker more than there are cores. Most end-to-end tests spend much of their
    time waiting on their own server and worker processes, and a third worker fills those waits."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(session, config, items):
    """Long tests first, so that no pytest worker starts a minute-long test while the others run out of work:
    modules by their number of `slow` tests (most first), each module's `slow` tests before its others. A module's
    tests stay together (its module-scoped fixtures are built once per worker)."""
    def slow(item) -> bool:
        return item.get_closest_marker("slow") is not None

    modules: dict = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = sorted(modules.values(), key=lambda its: -sum(map(slow, its)))  # stable: ties keep collection order
    items[:] = [it for its in order for it in sorted(its, key=lambda it: not slow(it))]


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling  # lazy: only under pytest-xdist

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if os.path.basename(path) in ONE_WORKER_MODULES else nodeid

    return ModuleFixtureScheduling(config, log)


def tiny_model(hidden: int = 8) -> nn.Module:
    """6 -> hidden -> 3, seeded: every call gives the same parameters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def batches_of(j: int):
    """Client j's data: batch k is seeded by (j, k), so any two drivers see the same batches."""
    def batch(k: int):
        g = torch.Generator().manual_seed(100 * j + k)
        return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    return batch


def make_cfg(workers: int = 2, rounds: int = 3, **kw) -> RunConfig:
    base = dict(task="lsq", workers=workers, rounds=rounds, lr=0.05, beta=0.3, schedule="constant", warmup=0,
                preset="muon", uplink="topk:0.5", downlink="topk:0.5")
    base.update(kw)
    return resolve(RunConfig(**base), {})


def server_model(cfg: RunConfig, evaluate=None) -> ServerModel:
    model = tiny_model()
    names, params = parameters_of(model)
    return ServerModel(names, params, model_specs(model, cfg), evaluate=evaluate)


class Harness:
    """`async with Harness(cfg) as h`: a Coordinator served on 127.0.0.1 (port 0), an aio channel and
    stub to it (`h.stub`), `h.worker(j)` for a Worker of client j, and raw Join / Exchange calls."""

    def __init__(self, cfg: RunConfig, evaluate=None, options: ServerOptions | None = None):
        self.cfg = cfg
        self.coordinator = Coordinator(cfg, server_model(cfg, evaluate), quiet=True, leave_timeout=5,
                                       options=options)

    async def __aenter__(self):
        self.server, self.port = await service.start(self.coordinator)
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.aio.insecure_channel(self.address, options=protocol.CHANNEL_OPTIONS)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(0)
        self.coordinator.executor.shutdown(wait=True)

    def worker(self, j: int | None, model: nn.Module | None = None, **kw) -> Worker:
        return Worker(model or tiny_model(), loss_fn, batches_of(j if j is not None else 0), server=self.address,
                      client_id=j, configure_threads=False, **kw)

    async def raw_join(self, j: int, model: nn.Module | None = None, version: int = protocol.PROTOCOL_VERSION):
        names, params = parameters_of(model or tiny_model())
        req = pb.JoinRequest(client_id=j, protocol_version=version, parameters=protocol.fingerprint(names, params))
        replies = [m async for m in self.stub.Join(req)]
        return replies[0].header

    async def raw_exchange(self, j: int, session: str, round_: int, frames: list[bytes]):
        def requests():
            yield pb.Submission(header=pb.SubmissionHeader(client_id=j, session=session, round=round_,
                                                           frame_lengths=[len(f) for f in frames]))
            for c in chunking.iter_chunks(frames):
                yield pb.Submission(chunk=c)
        replies = [m async for m in self.stub.Exchange(requests())]
        return replies[0].header, b"".join(m.chunk for m in replies[1:])


def reference_w(cfg: RunConfig) -> str:
    """The round of efmuon simulate, driven in-process with the same model, data and order."""
    model = tiny_model()
    names, params = parameters_of(model)
    specs = model_specs(model, cfg)
    server = ServerState(params, specs, cfg, cfg.workers)
    workers = [WorkerState(params, specs, cfg, j) for j in range(cfg.workers)]
    models = [tiny_model() for _ in range(cfg.workers)]

    def grads(j, k):
        batch = batches_of(j)(k)
        return gradients(models[j], workers[j].W, lambda m: loss_fn(m, batch))[1]

    if cfg.init == "grad":
        server.aggregate({j: workers[j].init_uplink(grads(j, 0)) for j in range(cfg.workers)}, init=True)
    for k in range(1, cfg.rounds + 1):
        frames = server.step()
        ups = {}
        for j in range(cfg.workers):
            workers[j].apply_downlink(frames)
            ups[j] = workers[j].make_uplink(grads(j, k))
        server.aggregate(ups)
    return params_sha256(server.W, names)


async def run_workers(*workers: Worker) -> list[dict]:
    return await asyncio.gather(*(asyncio.to_thread(w.run) for w in workers))


# ---------------------------------------------------------------------------------------------- relay clock
class RelayClock:
    """A fake clock for efmuon.worker.shaping (see `relay_clock`): the relay's `time.monotonic()` reads
    `t`, and its `asyncio.sleep(d)` records d in `sleeps`, moves `t` on by d and yields to the loop
    once. Moving the clock by every sleep is exact while one task of the relay sleeps at a time: the
    rate pump (its only sleeper is the token bucket) or a delay pump without a rate (only its writer
    sleeps)."""

    def __init__(self, t: float = 1000.0):
        self.t = t
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += max(0.0, seconds)
        await _real_sleep(0)


_real_sleep = asyncio.sleep


class _AsyncioWithSleep:
    """asyncio as the relay module sees it under `relay_clock`: everything real but `sleep`."""

    def __init__(self, sleep):
        self.sleep = sleep

    def __getattr__(self, name: str):
        return getattr(asyncio, name)


@pytest.fixture
def relay_clock(monkeypatch) -> RelayClock:
    """Puts the relay's link shaping (efmuon.worker.shaping: token bucket, rate and delay pumps) on a
    RelayClock for the test (its `time` and `asyncio.sleep` only)."""
    clock = RelayClock()
    monkeypatch.setattr(shaping, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=time.sleep))
    monkeypatch.setattr(shaping, "asyncio", _AsyncioWithSleep(clock.sleep))
    return clock

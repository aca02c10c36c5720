"""`efmuon server` and `efmuon run`: a Coordinator for a built-in task, served over gRPC.

`run_local` is the embedded default: the server in this process on 127.0.0.1 (a free port the
OS picks) and n worker processes `python -m efmuon.worker --server 127.0.0.1:PORT --client-id j`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from efmuon.common.config import RunConfig
from efmuon.common.errors import ConfigError, EfmuonError

FEDERATED_KEYS = ("clients", "participation", "link", "link_mix", "link_trace", "deadline", "compute_scale",
                  "compute_seconds")
from efmuon.common.training import configure_torch, resolve_device
from efmuon.server.coordinator import Coordinator, ServerModel
from efmuon.server.service import serve

log = logging.getLogger("efmuon.server")

WORKER_EXIT_TIMEOUT = 60.0  # seconds local workers get to exit after the run finished


class WorkerProcessError(EfmuonError):
    """A local worker process exited with an error."""


def build_coordinator(cfg: RunConfig, quiet: bool = False, stream=None) -> Coordinator:
    """The task's model and evaluation from `Setup(cfg)`, exactly as `efmuon simulate` builds them."""
    from efmuon.common.simulate import Setup

    given = [k for k in FEDERATED_KEYS if getattr(cfg, k, None) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: federated settings are emulated by `efmuon simulate` only; the "
                          "networked server runs synchronous rounds over all --workers clients (leave them unset)")
    configure_torch(cfg.threads)
    setup = Setup(cfg)
    return Coordinator(setup.cfg, ServerModel.from_setup(setup), device=resolve_device(setup.cfg.device),
                       quiet=quiet, stream=stream)


def run_server(cfg: RunConfig, host: str, port: int, quiet: bool = False) -> dict:
    """`efmuon server`: serve one run for workers on other machines; returns the report."""

    async def main() -> dict:
        coordinator = build_coordinator(cfg, quiet=quiet)

        def ready(bound: int) -> None:
            print(f"efmuon server: listening on {host}:{bound} for {coordinator.n} workers "
                  f"({coordinator.rounds} rounds, task {coordinator.cfg.task}); "
                  f"start them with: efmuon worker --server HOST:{bound} --client-id J", file=sys.stderr, flush=True)

        return await serve(coordinator, host, port, on_ready=ready)

    return asyncio.run(main())


def worker_command(address: str, client_id: int) -> list[str]:
    return [sys.executable, "-m", "efmuon.worker", "--server", address, "--client-id", str(client_id), "--quiet"]


async def _watch(procs: list[asyncio.subprocess.Process]) -> None:
    """Returns when every worker exited with 0; raises when one fails."""
    waits = {asyncio.ensure_future(p.wait()): j for j, p in enumerate(procs)}
    try:
        while waits:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                j = waits.pop(f)
                if f.result() in (130, -signal.SIGINT, -signal.SIGTERM):
                    await asyncio.sleep(1.0)  # Ctrl-C reached the workers too: let the server's handler see it
                if f.result() != 0:
                    raise WorkerProcessError(f"worker {j} exited with code {f.result()} (its error is printed above)")
    finally:
        for f in waits:
            f.cancel()


def run_local(cfg: RunConfig, quiet: bool = False, stream=None) -> dict:
    """`efmuon run`: the server here and cfg.workers worker processes on 127.0.0.1."""

    async def main() -> dict:
        coordinator = build_coordinator(cfg, quiet=quiet, stream=stream)
        procs: list[asyncio.subprocess.Process] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        async def launch(port: int) -> None:
            address = f"127.0.0.1:{port}"
            for j in range(coordinator.n):
                procs.append(await asyncio.create_subprocess_exec(
                    *worker_command(address, j), stdin=asyncio.subprocess.DEVNULL, env=env))
            await _watch(procs)

        try:
            report = await serve(coordinator, "127.0.0.1", 0, on_ready=launch)
            try:
                await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), WORKER_EXIT_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("workers did not exit within %.0f s after the run; stopping them", WORKER_EXIT_TIMEOUT)
            return report
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
            for p in procs:
                try:
                    await asyncio.wait_for(p.wait(), 10)
                except asyncio.TimeoutError:
                    p.kill()

    return asyncio.run(main())

"""`efmuon server`: a Coordinator for a built-in task, served over gRPC to workers on other machines.

`build_coordinator` is shared with `efmuon run` (server.local), which serves the same Coordinator
to local worker processes. `server.listen.check_listen` refuses the startup mistakes before the model
is built (the CLI calls it before torch is even imported, so a mistake fails at once).
"""
from __future__ import annotations

import asyncio
import sys

from ..common.config import RunConfig
from ..common.federation import task_setup
from ..common.runtime import configure_torch, resolve_device
from .coordinator import Coordinator, ServerModel
from .listen import check_listen
from .service import serve

def build_coordinator(cfg: RunConfig, quiet: bool = False, stream=None, options=None, resume=None,
                      links_ok: bool = True) -> Coordinator:
    """The task's model and evaluation from `federation.task_setup(cfg)`, exactly as `efmuon simulate`
    builds them (cut for the n clients in a cohort run). Links in the configuration are emulated by
    the workers (each shapes its connection with its profile; `efmuon run --shaping netns` in the kernel)."""
    configure_torch(cfg.threads)
    setup, _ = task_setup(cfg)
    device = resolve_device(setup.cfg.device)
    return Coordinator(setup.cfg, ServerModel.from_setup(setup, device), device=device,
                       quiet=quiet, stream=stream, options=options, resume=resume)


def run_server(cfg: RunConfig, host: str, port: int, quiet: bool = False, options=None, resume=None,
               insecure: bool = False) -> dict:
    """`efmuon server`: serve one run for workers on other machines; returns the report.
    `options`: a coordinator.ServerOptions; `resume`: a loaded server checkpoint to continue from;
    `insecure`: allow plaintext on an address other than loopback (with a warning; `check_listen`)."""
    check_listen(host, port, options, insecure)

    async def main() -> dict:
        coordinator = build_coordinator(cfg, quiet=quiet, options=options, resume=resume)

        def ready(bound: int) -> None:
            who = (f"a federation of {coordinator.n} clients (cohort rounds, participation "
                   f"{coordinator.cfg.participation or 1:g})" if coordinator.cohorts else f"{coordinator.n} workers")
            print(f"efmuon server: listening on {host}:{bound} for {who} "
                  f"({coordinator.rounds} rounds, task {coordinator.cfg.task}); "
                  f"start them with: efmuon worker --server HOST:{bound} --client-id J (or --clients A-B)",
                  file=sys.stderr, flush=True)

        return await serve(coordinator, host, port, on_ready=ready)

    return asyncio.run(main())

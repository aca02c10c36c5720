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
from ..common.shards import parse_shard
from .coordinator import Coordinator, ServerModel
from .listen import check_listen
from .service import serve

def build_coordinator(cfg: RunConfig, quiet: bool = False, stream=None, options=None, resume=None,
                      links_ok: bool = True, setup=None) -> Coordinator:
    """The task's model and evaluation from `federation.task_setup(cfg)`, exactly as `efmuon simulate`
    builds them (cut for the n clients in a cohort run). Links in the configuration are emulated by
    the workers (each shapes its connection with its profile; `efmuon run --shaping netns` in the kernel).
    With `options.shard` ('I/N', docs/design.md §6.3) the Coordinator holds shard I's layers only
    (`ServerModel.shard_of`). `setup`: a task setup built before from `cfg` (efmuon run --shards builds one
    for all shards; `cfg` is then its `setup.cfg`, with the shard's own outputs)."""
    configure_torch(cfg.threads)
    if setup is None:
        setup, _ = task_setup(cfg)
        cfg = setup.cfg  # with the task's defaults; a setup given was built from (a copy of) cfg
    device = resolve_device(cfg.device)
    shard = getattr(options, "shard", None)
    if shard:
        index, count = parse_shard(shard)
        model = ServerModel.shard_of(setup, index, count)
    else:
        model = ServerModel.from_setup(setup, device)
    return Coordinator(cfg, model, device=device,
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
            if coordinator.model.shard is not None:
                i, n = coordinator.model.shard
                who += (f" as shard {i}/{n} ({len(coordinator.model.layer_ids)} layers, "
                        f"{coordinator.numel} parameters; workers give every shard: --server HOST:PORT0,HOST:PORT1,...)")
            print(f"efmuon server: listening on {host}:{bound} for {who} "
                  f"({coordinator.rounds} rounds, task {coordinator.cfg.task}); "
                  f"start them with: efmuon worker --server HOST:{bound} --client-id J (or --clients A-B)",
                  file=sys.stderr, flush=True)

        return await serve(coordinator, host, port, on_ready=ready)

    return asyncio.run(main())

"""`efmuon server`: a Coordinator for a built-in task, served over gRPC to workers on other machines.

`build_coordinator` is shared with `efmuon run` (server.local), which serves the same Coordinator
to local worker processes. `server.listen.check_listen` refuses the startup mistakes before the model
is built (the CLI calls it before torch is even imported, so a mistake fails at once).
"""
from __future__ import annotations

import asyncio
import sys

from ..common.config import RunConfig
from ..common.errors import ConfigError
from ..common.federation import LINK_KEYS, has_links
from ..common.model import Setup
from ..common.runtime import configure_torch, resolve_device
from .coordinator import Coordinator, ServerModel
from .listen import check_listen
from .service import serve

FEDERATED_KEYS = ("clients", "participation", "link", "link_mix", "link_trace", "deadline", "compute_scale",
                  "compute_seconds")


def build_coordinator(cfg: RunConfig, quiet: bool = False, stream=None, links_ok: bool = False,
                      options=None, resume=None) -> Coordinator:
    """The task's model and evaluation from `Setup(cfg)`, exactly as `efmuon simulate` builds them.
    `links_ok`: the caller (`run_local`) emulates link, link_mix, link_trace, links and shaping."""
    if not links_ok and (has_links(cfg) or cfg.shaping is not None):
        raise ConfigError("link, link_mix, link_trace, [links] and shaping are emulated by `efmuon run` "
                          "(--shaping inproc|netns) and `efmuon simulate`; with `efmuon server` each worker "
                          "shapes its own connection: efmuon worker --link PROFILE")
    given = [k for k in FEDERATED_KEYS if getattr(cfg, k, None) is not None and not (links_ok and k in LINK_KEYS)]
    if given:
        raise ConfigError(f"{', '.join(given)}: federated settings are emulated by `efmuon simulate` only; the "
                          "networked server runs synchronous rounds over all --workers clients (leave them unset)")
    configure_torch(cfg.threads)
    setup = Setup(cfg)
    return Coordinator(setup.cfg, ServerModel.from_setup(setup), device=resolve_device(setup.cfg.device),
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
            print(f"efmuon server: listening on {host}:{bound} for {coordinator.n} workers "
                  f"({coordinator.rounds} rounds, task {coordinator.cfg.task}); "
                  f"start them with: efmuon worker --server HOST:{bound} --client-id J", file=sys.stderr, flush=True)

        return await serve(coordinator, host, port, on_ready=ready)

    return asyncio.run(main())

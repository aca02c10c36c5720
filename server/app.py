"""`efmuon server`: a Coordinator for a built-in task, served over gRPC to workers on other machines.

`build_coordinator` is shared with `efmuon run` (server.local), which serves the same Coordinator
to local worker processes. `check_listen` refuses startup mistakes before the model is built: a
port outside 0..65535 or in use, a host that is not an address, bad TLS files, and plaintext on an
address other than loopback without `--insecure`.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import sys

from ..common.config import RunConfig
from ..common.errors import ConfigError
from ..common.federation import LINK_KEYS, has_links
from ..common.model import Setup
from ..common.runtime import configure_torch, resolve_device
from .auth import server_credentials
from .coordinator import Coordinator, ServerModel
from .service import serve

FEDERATED_KEYS = ("clients", "participation", "link", "link_mix", "link_trace", "deadline", "compute_scale",
                  "compute_seconds")

log = logging.getLogger("efmuon.server")


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


def listen_addresses(host: str, port: int) -> list[tuple]:
    """The (family, sockaddr) pairs `host` names for listening; ConfigError for a port outside
    0..65535 or a host that is neither an address nor a name that resolves."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port: give 0..65535 (0: any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ConfigError(f"--host {host!r} is not an address ({reason}): give an IP address or name of one of "
                          "this machine's interfaces, 0.0.0.0 for all, or 127.0.0.1 for this machine only") from None
    return list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))


def is_loopback(addresses: list[tuple]) -> bool:
    """True when every address is a loopback one (127.0.0.0/8, ::1): nothing off this machine reaches it."""
    return all(ipaddress.ip_address(sockaddr[0].split("%")[0]).is_loopback for _, sockaddr in addresses)


def check_bindable(host: str, port: int, addresses: list[tuple]) -> None:
    """ConfigError when something (another efmuon server, any program) already listens on `port`, or
    `host` is not an address of this machine. A probe socket binds each address and closes at once."""
    for family, sockaddr in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: ignore TIME_WAIT leftovers
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"port {port} on {host} is already in use (another efmuon server, or another "
                                      "program, listens there): stop it, or pick another --port (0: any free "
                                      "port)") from None
                raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}): --host must be an address of "
                                  "this machine, 0.0.0.0 for all, or 127.0.0.1") from None


PLAINTEXT_RISK = ("the model, every update and any bearer token cross the network unencrypted, and anyone on the "
                  "path can read or alter them")


def check_listen(host: str, port: int, options=None, insecure: bool = False) -> None:
    """Refuse `efmuon server`'s startup mistakes with one ConfigError (module docstring); warn when
    `insecure` allows plaintext on an address other than loopback."""
    addresses = listen_addresses(host, port)
    tls = options is not None and options.tls_cert is not None
    if tls:
        server_credentials(options.tls_cert, options.tls_key, options.tls_ca)  # files readable, key matches cert
    plaintext = not tls and not is_loopback(addresses)
    if plaintext and not insecure:
        raise ConfigError(f"refusing to serve plaintext on {host}, which is not a loopback address: "
                          f"{PLAINTEXT_RISK}. Serve TLS with --tls-cert/--tls-key (efmuon certs DIR makes "
                          "development ones), listen on --host 127.0.0.1, or pass --insecure to accept the risk")
    check_bindable(host, port, addresses)
    if plaintext:
        log.warning("serving PLAINTEXT on %s (--insecure): %s; use --tls-cert/--tls-key outside a trusted network",
                    host, PLAINTEXT_RISK)


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

"""Where `efmuon server` listens, checked before anything is built: a port outside 0..65535 or in use,
a host that is not an address of this machine, TLS files that are missing, unreadable or do not
match, and plaintext on an address other than loopback without `--insecure` are each one ConfigError.
Light on purpose (no torch): `efmuon server` runs it before the model and the coordinator exist.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket

from ..common.errors import ConfigError
from .auth import server_credentials

log = logging.getLogger("efmuon.server")


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

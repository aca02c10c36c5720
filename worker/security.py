"""How a worker's channel is secured: TLS (server certificate, optionally mutual) and a bearer token.

    Security(tls_ca="ca.pem")                                   TLS, trust this CA
    Security(tls_ca="ca.pem", tls_cert="c.pem", tls_key="c.key") mutual TLS
    Security(token="...")                                       a bearer token (with or without TLS)
    Security(token="...", insecure=True)                        a token without TLS to a remote server

A token without TLS goes to a server on a loopback address (127.0.0.0/8, ::1, localhost) only, unless
`insecure` allows it elsewhere (with a warning): in plaintext anyone on the path can read and reuse it
(`check_transport`).

The token travels as per-call metadata ``authorization: Bearer <token>`` (`auth.auth_metadata`), which
works on secure and insecure channels alike. When the channel goes through the worker's
byte-counting relay (127.0.0.1:RELAY), TLS still verifies the server's name: the relay only forwards
bytes, and `grpc.ssl_target_name_override` names the real host.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import grpc

from ..common.errors import ConfigError
from ..common.wire import protocol
from ..common.wire.credentials import auth_metadata, channel_credentials

log = logging.getLogger("efmuon.worker")


@dataclass
class Security:
    """A worker's TLS files (CA, and for mutual TLS its certificate and key) and bearer token."""

    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    insecure: bool = False  # allow a token without TLS to a server off loopback (`check_transport`)

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def metadata(self) -> tuple:
        if not self.token:
            return ()
        return auth_metadata(self.token)


def make_channel(target: str, server_host: str, security: Security | None) -> grpc.Channel:
    """A sync channel to `target` (the server, or the relay in front of it) with `security`."""
    if security is None or not security.tls:
        return grpc.insecure_channel(target, options=protocol.CHANNEL_OPTIONS)
    creds = channel_credentials(security.tls_ca, security.tls_cert, security.tls_key)
    options = list(protocol.CHANNEL_OPTIONS)
    if not target.startswith(server_host + ":"):
        options.append(("grpc.ssl_target_name_override", server_host))
    return grpc.secure_channel(target, creds, options=options)


def is_loopback_host(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or the name localhost; names are not resolved."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def check_transport(server_host: str, security: Security | None) -> None:
    """Refuse (ConfigError) a bearer token sent without TLS to a server that is not on loopback,
    unless `security.insecure`; then warn."""
    if security is None or not security.token or security.tls or is_loopback_host(server_host):
        return
    risk = (f"the bearer token would cross the network to {server_host} in plaintext, where anyone on the path "
            "can read and reuse it")
    if not security.insecure:
        raise ConfigError(f"refusing to send a token without TLS: {risk}. Give --tls-ca CA.pem (the server then "
                          "needs --tls-cert/--tls-key), or pass --insecure to accept the risk")
    log.warning("sending the token in PLAINTEXT (--insecure): %s; use --tls-ca outside a trusted network", risk)

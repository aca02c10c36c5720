"""The worker's connection to the server: one gRPC channel, secured by `security.Security`, straight
to the server, or through the in-process relay (`relay.CountingRelay`) when the link is shaped or the
worker counts the wire bytes itself.

The server counts what each connection carried (server/wirecount.py), so by default the channel goes
directly (the relay's extra loopback hop costs goodput, BENCHMARKS.md transport). Through the relay,
`Connection.since_mark` reads its counters around every call: what one call carried, as the
`WireReport` the worker sends with its next call, which the server checks against its own count.
`WorkerError` is what every failure of the worker becomes (a refused Join, a lost connection, a
protocol error), with the gRPC status code if any.
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import grpc

from ..common.errors import ConfigError, EfmuonError
from ..v1 import service_pb2 as pb
from .stub import client_stub
from .relay import CountingRelay
from .security import check_transport, make_channel

if TYPE_CHECKING:
    from ..common.links import LinkProfile
    from .security import Security


class WorkerError(EfmuonError):
    """The server refused the worker, or the connection failed; the message says which."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class WorkerStopped(WorkerError):
    """The worker was asked to stop (`Connection.stop`, `Worker.stop`): e.g. another client hosted in the
    same process failed. Never retried; the worker leaves with the reason."""


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 < int(port) <= 65535:
        raise WorkerError(f"server address {address!r} is not HOST:PORT with a port 1..65535 (e.g. 127.0.0.1:50051)")
    return host.strip("[]"), int(port)


def split_servers(server: str) -> list[str]:
    """'HOST:P0,HOST:P1' -> the addresses, in shard order (one address: a single server)."""
    parts = [p.strip() for p in str(server).split(",")]
    if any(not p for p in parts):
        raise ConfigError(f"--server {server!r}: give HOST:PORT, or the shards' HOST:PORT addresses separated by "
                          "commas in shard order (HOST:P0,HOST:P1,...), with no empty entry")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"--server {server!r} names an address twice: each shard has its own server")
    return parts


def rpc_error(what: str, exc: grpc.RpcError) -> WorkerError:
    """A failed call as a WorkerError: `what` failed (CODE): the server's details."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "ERROR"
    return WorkerError(f"{what} failed ({name}): {details}", code)


class Connection:
    """A gRPC channel to the server; through the relay when `link` is given or `measure_wire` is True.

    measure_wire: True: count the bytes here too (through the relay, also without a link) and send them
                  as WireReports, a cross-check of the server's count; None (default): send them when
                  the relay is there anyway (a shaped link); False: never send them."""

    def __init__(self, server: str, measure_wire: bool | None = None, link: LinkProfile | str | None = None,
                 security: Security | None = None):
        self.server = server
        self.security = security  # TLS and/or a bearer token (None: neither)
        host, port = split_address(server)
        try:  # a name that does not resolve is a mistake to name now, not a retry loop
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise WorkerError(f"the server's host {host!r} does not resolve ({exc}); check --server HOST:PORT") from None
        check_transport(host, security)  # no token in plaintext off loopback without --insecure
        self.relay = None
        self.link = link  # a LinkProfile or spec the relay shapes this connection with (None: unshaped)
        self.transfers: list[dict] = []  # per call: {"exchange", "up": [bytes, s] | None, "down": ...}
        self.reports = measure_wire is not False  # WireReports from the relay's counts, if there is one
        target = server
        if measure_wire or link is not None:
            self.relay = CountingRelay(host, port, link=link)
            lhost, lport = self.relay.start()
            target = f"{lhost}:{lport}"
        self.channel = make_channel(target, host, security)
        self.metadata = security.metadata() if security is not None else ()
        self.stub = client_stub(self.channel)  # chunk messages sent pre-serialized, read as views
        self._mark = self.counters()
        self.stopped: str | None = None  # why the worker was asked to stop (`stop`), or None
        self.call = None  # the Join or Exchange in flight (silence.Silence.watch), cancelled by `stop`

    def stop(self, reason: str) -> None:
        """Ask the worker on this connection to stop (from any thread): the call in flight is cancelled
        and every later call fails with WorkerStopped(reason), never retried."""
        self.stopped = reason
        call = self.call
        if call is not None:
            call.cancel()

    def check_stopped(self) -> None:
        if self.stopped is not None:
            raise WorkerStopped(self.stopped)

    def counters(self) -> dict[str, int] | None:
        return self.relay.counters() if self.relay is not None else None

    def since_mark(self, exchange: int) -> pb.WireReport | None:
        """Bytes the connection carried since the last call of this method, as a WireReport."""
        now = self.counters()
        if now is None:
            return None
        rep = pb.WireReport(exchange=exchange, up=now["up"] - self._mark["up"], down=now["down"] - self._mark["down"])
        self._mark = now
        t = self.relay.take_transfers()  # how long this call's data took (achieved link rate)
        self.transfers.append({"exchange": exchange, "up": t["up"], "down": t["down"]})
        return rep if self.reports else None

    def status(self, timeout: float | None = 30.0) -> pb.StatusReply:
        try:
            return self.stub.Status(pb.StatusRequest(), timeout=timeout, wait_for_ready=True, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(f"Status at {self.server}", exc) from None
        finally:
            if self.relay is not None:  # a transfer of its own, not part of the Join that follows
                t = self.relay.take_transfers()
                self.transfers.append({"exchange": "status", "up": t["up"], "down": t["down"]})

    def close(self) -> None:
        self.channel.close()
        if self.relay is not None:
            self.relay.stop()

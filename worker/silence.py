"""Noticing, during a call, a server that stopped answering (its host vanished, the process was
stopped) however slow the link.

gRPC's keepalive pings every `protocol.KEEPALIVE_TIME_S` and drops the connection when a ping is
not acknowledged within `protocol.PING_TIMEOUT_S`. That timeout must stay long: on a slow link the
acknowledgement waits behind the megabytes already queued in the other direction, and gRPC applies
the same timeout to its flow-control (BDP) pings. `Silence` watches the worker's byte-counting
relay instead while a call is in flight: an answering server sends something at least every
KEEPALIVE_TIME_S (the acknowledgement of a keepalive ping, window updates, its own pings) or takes
the worker's data. When it did neither for `SILENCE_S`, the call is cancelled and becomes a
`ServerSilent` error (UNAVAILABLE). Without a relay (`--no-wire`) gRPC's keepalive alone notices,
within KEEPALIVE_TIME_S + PING_TIMEOUT_S.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import grpc

from ..common.wire import protocol
from .connection import WorkerError, WorkerStopped, rpc_error

if TYPE_CHECKING:
    from .connection import Connection

SILENCE_S = 2 * protocol.KEEPALIVE_TIME_S + 5.0  # two keepalive pings unanswered, and some slack
MIN_TAKEN_BYTES = 4096  # the server took this much of ours: progress (a keepalive ping is 17 bytes)
POLL_S = 0.5


class ServerSilent(WorkerError):
    """A call cancelled because the server sent nothing and took nothing for `SILENCE_S` seconds."""

    def __init__(self, what: str, server: str, seconds: float):
        self.cause = (f"the server at {server} stopped answering (nothing came from it for {seconds:g} s, and it "
                      f"took none of this worker's bytes)")
        super().__init__(f"{what} failed: {self.cause}", grpc.StatusCode.UNAVAILABLE)


class Silence:
    """Watches one call (`watch(call)`) while the `with` block runs; `fired` once it cancelled it.

        with Silence(conn) as silence:
            call = stub.Exchange(...)
            silence.watch(call)
            for msg in call: ...

    Does nothing when the connection has no relay."""

    def __init__(self, conn: Connection, seconds: float = SILENCE_S):
        self.conn, self.seconds = conn, seconds
        self.fired = False
        self._call = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Silence:
        if self.conn.relay is not None:
            self._thread = threading.Thread(target=self._run, name="efmuon-silence", daemon=True)
            self._thread.start()
        return self

    def watch(self, call) -> None:
        self._call = call
        self.conn.call = call  # what `Connection.stop` cancels
        if self.conn.stopped is not None:
            call.cancel()

    def __exit__(self, *exc) -> None:
        self.conn.call = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def error(self, what: str) -> ServerSilent:
        return ServerSilent(what, self.conn.server, self.seconds)

    def failure(self, what: str, exc: grpc.RpcError) -> WorkerError:
        """What the call's failure `exc` means: the worker was stopped (`Connection.stop`), the server went
        silent, or the call failed (`connection.rpc_error`)."""
        if self.conn.stopped is not None:
            return WorkerStopped(self.conn.stopped)
        if self.fired:
            return self.error(what)
        return rpc_error(what, exc)

    def _run(self) -> None:
        last, since = self.conn.counters(), time.monotonic()
        while not self._stop.wait(POLL_S):
            now, seen = time.monotonic(), self.conn.counters()
            if seen["down"] != last["down"] or seen["up"] - last["up"] >= MIN_TAKEN_BYTES:
                last, since = seen, now
            elif now - since >= self.seconds and self._call is not None:
                self.fired = True
                self._call.cancel()
                return

"""Reconnecting: which failures a worker rides out, every call's deadline, and the loops that try a
call again with backoff until a deadline.

A worker that knows its client id and has a `reconnect_timeout` re-joins after a lost connection or
a server restart (e.g. from a checkpoint) and resends the submission it holds, or is re-synced
(`Worker.run`). It gives up on any other failure, and when another process took its client id over.

No call waits without a deadline (`call_timeout`), and a server that vanished without closing the
connection (host down, process stopped) is noticed within `silence.SILENCE_S` (through the relay;
without one, gRPC's keepalive: `protocol.KEEPALIVE_TIME_S + PING_TIMEOUT_S`), also while an Exchange
waits at the round barrier. `keep_trying` is the one retry loop (first contact, re-Join): each attempt gets what is left
of the loop's time, so the loop, a call in flight included, ends by its deadline; a failure that
`failures.diagnose` calls permanent (a TLS mistake) ends it at once.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import grpc

from .connection import Connection, WorkerError
from .failures import PROBE_TIMEOUT_S, Diagnosis, diagnose

if TYPE_CHECKING:
    from ..v1 import service_pb2 as pb

log = logging.getLogger("efmuon.worker")

T = TypeVar("T")

# a call that failed with one of these is retried by re-joining
RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                   grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION})
# a re-Join that failed with one of these is tried again after the backoff (the server is not back yet)
REJOIN_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                          grpc.StatusCode.DEADLINE_EXCEEDED})
# the first Status or Join that failed with one of these is tried again (the server is not up yet)
CONTACT_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# Deadlines: a call may take its wait plus its bytes at MIN_TRANSFER_BYTES_PER_S (a generous floor:
# 256 kbit/s). An Exchange waits at the round barrier for up to the server's --round-deadline (600 s
# by default) and then for the round's aggregation, step and evaluation; one that outlives its
# deadline is retried like a lost connection (re-join, resend: the server never applies it twice).
MIN_TRANSFER_BYTES_PER_S = 32 * 1024
EXCHANGE_WAIT_S = 900.0
JOIN_WAIT_S = 120.0
CONTACT_WINDOW_S = 30.0  # the default first-contact window (a worker started before its server)
STATUS_ATTEMPT_S = 2.0  # the first Status attempt's deadline; each retry doubles it
MIN_ATTEMPT_S = 0.05  # less time than this left: give up rather than start another attempt
FINAL_PROBE_S = 1.0  # the probe after the last attempt when none found a cause (e.g. a 2 s --connect-timeout)


def call_timeout(wait: float, nbytes: int) -> float:
    """The deadline of a call that waits up to `wait` s and carries `nbytes` bytes."""
    return wait + nbytes / MIN_TRANSFER_BYTES_PER_S


def contact_window(reconnect_timeout: float, connect_timeout: float | None = None) -> float:
    """How long a worker tries to reach the server before its first Join succeeded: `connect_timeout`
    where given (--connect-timeout), else 30 s or `reconnect_timeout`, whichever is longer."""
    if connect_timeout is not None:
        return float(connect_timeout)
    return max(CONTACT_WINDOW_S, reconnect_timeout)


def retryable(exc: WorkerError, reconnect_timeout: float, client_id: int | None) -> bool:
    """Whether the worker re-joins after `exc` rather than failing."""
    if exc.code not in RETRY or reconnect_timeout <= 0 or client_id is None:
        return False
    # our id was taken over by another process: do not fight over it
    return "another process holds this client id" not in str(exc)


def explained(exc: WorkerError, conn: Connection) -> WorkerError:
    """`exc` with its cause in words prepended where gRPC's details name one (no probe)."""
    cause = diagnose(conn, exc, 0.0)
    return exc if cause is None else WorkerError(f"{cause.message}: {exc}", exc.code)


class Backoff:
    """Delays of 0.2 s doubling to 2 s, each scaled by a random factor in [0.5, 1.5) so that the workers
    of a restarted server do not all come back in the same instant. Its own random source: the
    process's `random` state is left as it is."""

    def __init__(self, first: float = 0.2, cap: float = 2.0):
        self.delay, self.cap = first, cap
        self._rng = random.Random()

    def next(self) -> float:
        d = self.delay * self._rng.uniform(0.5, 1.5)
        self.delay = min(self.delay * 2, self.cap)
        return d


def keep_trying(attempt: Callable[[float], T], seconds: float, conn: Connection, retry: frozenset,
                gave_up: Callable[[Diagnosis | None, WorkerError], str]) -> T:
    """`attempt(timeout)` until it returns, for at most `seconds` in all: each attempt's timeout is what
    is left. A failure with a code in `retry` is diagnosed (`failures.diagnose`): a permanent cause
    is raised at once, a transient one is logged (once per cause) and tried again after the backoff;
    when the time is up, a WorkerError with `gave_up(last diagnosis, last error)` is raised."""
    deadline = time.monotonic() + seconds
    backoff = Backoff()
    told: set[str] = set()
    cause = None  # the last cause a diagnosis found (the last attempt may leave no time to probe)
    while True:
        try:
            return attempt(max(MIN_ATTEMPT_S, deadline - time.monotonic()))
        except WorkerError as exc:
            if exc.code not in retry:
                raise
            probe_s = min(PROBE_TIMEOUT_S, deadline - time.monotonic())
            if probe_s < MIN_ATTEMPT_S and cause is None:
                probe_s = FINAL_PROBE_S  # the time is spent and no cause known yet: one short probe names it
            found = diagnose(conn, exc, probe_s)
            if found is not None or probe_s >= MIN_ATTEMPT_S:
                cause = found
            if cause is not None and cause.permanent:
                raise WorkerError(cause.message, exc.code) from None
            left = deadline - time.monotonic()
            if left < MIN_ATTEMPT_S:
                raise WorkerError(gave_up(cause, exc), exc.code) from None
            if cause is not None and cause.message not in told:
                told.add(cause.message)
                log.warning("%s; trying again for up to %.0f s", cause.message, left)
            time.sleep(min(backoff.next(), left))
            if deadline - time.monotonic() < MIN_ATTEMPT_S:
                raise WorkerError(gave_up(cause, exc), exc.code) from None


def rejoin_with_backoff(join: Callable[[float], None], why: WorkerError, reconnect_timeout: float,
                        client_id: int | None, conn: Connection) -> None:
    """Call `join(timeout)` with backoff until it succeeds, for up to `reconnect_timeout` seconds in all
    (a Join in flight included); a failure not in REJOIN_RETRY, or a permanent one (a TLS mistake),
    is raised at once, the last one as a WorkerError at the end."""
    lost = diagnose(conn, why, 0.0)  # from gRPC's details only: the probes are for the re-Joins
    log.warning("client %s: %s; reconnecting (up to %.0f s)", client_id, lost.message if lost else why,
                reconnect_timeout)

    def gave_up(cause: Diagnosis | None, exc: WorkerError) -> str:
        said = cause.message if cause is not None else (lost.message if lost is not None else str(exc))
        return f"client {client_id}: {said}; the server did not come back within {reconnect_timeout:g} s " \
               f"(--reconnect-timeout)"

    keep_trying(join, reconnect_timeout, conn, REJOIN_RETRY, gave_up)


def contact(conn: Connection, seconds: float) -> pb.StatusReply:
    """The server's first Status reply, trying for up to `seconds` (e.g. the worker started before the
    server listens): each attempt waits for the channel for 2 s, then twice as long as the last;
    nothing listening is logged at once, a TLS mistake fails within one attempt."""
    attempt_s = [STATUS_ATTEMPT_S]

    def status(left: float) -> pb.StatusReply:
        t = min(attempt_s[0], left)
        attempt_s[0] *= 2
        return conn.status(timeout=t)

    def gave_up(cause: Diagnosis | None, exc: WorkerError) -> str:
        said = cause.message if cause is not None else str(exc)
        return f"{said} (tried for {seconds:g} s)"

    return keep_trying(status, seconds, conn, CONTACT_RETRY, gave_up)


def reach(server: str, seconds: float, measure_wire: bool | None = None, link=None,
          security=None) -> tuple[Connection, pb.StatusReply]:
    """A Connection to `server` and the server's first Status reply (`contact`, for up to `seconds`);
    the connection is closed when the server cannot be reached. Loads no torch: `efmuon worker`
    calls it before it builds the model, so a wrong address or a TLS mistake fails at once."""
    conn = Connection(server, measure_wire, link=link, security=security)
    try:
        return conn, contact(conn, seconds)
    except BaseException:
        conn.close()
        raise

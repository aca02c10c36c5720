"""Reconnecting: which failures a worker rides out, and the re-Join loop with backoff.

A worker that knows its client id and has a `reconnect_timeout` re-joins after a lost connection or
a server restart (e.g. from a checkpoint) and resends the submission it holds, or is re-synced
(`Worker.run`). It gives up on any other failure, and when another process took its client id over.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from .connection import WorkerError

log = logging.getLogger("efmuon.worker")

# a call that failed with one of these is retried by re-joining
RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                   grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION})
# a re-Join that failed with one of these is tried again after the backoff (the server is not back yet)
REJOIN_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                          grpc.StatusCode.DEADLINE_EXCEEDED})


def retryable(exc: WorkerError, reconnect_timeout: float, client_id: int | None) -> bool:
    """Whether the worker re-joins after `exc` rather than failing."""
    if exc.code not in RETRY or reconnect_timeout <= 0 or client_id is None:
        return False
    # our id was taken over by another process: do not fight over it
    return "another process holds this client id" not in str(exc)


def rejoin_with_backoff(join: Callable[[], None], why: WorkerError, reconnect_timeout: float,
                        client_id: int | None) -> None:
    """Call `join` with backoff (0.2 s doubling to 2 s) until it succeeds, for up to `reconnect_timeout`
    seconds; a failure not in REJOIN_RETRY is raised at once, the last one as a WorkerError at the end."""
    deadline = time.monotonic() + reconnect_timeout
    delay = 0.2
    log.warning("client %s: %s; reconnecting (up to %.0f s)", client_id, why, reconnect_timeout)
    while True:
        try:
            join()
            return
        except WorkerError as exc:
            if exc.code not in REJOIN_RETRY:
                raise
            if time.monotonic() + delay > deadline:
                raise WorkerError(f"client {client_id}: the server did not come back within "
                                  f"{reconnect_timeout:.0f} s: {exc}", exc.code) from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

"""Many clients in one process (`efmuon worker --clients 0-15`): which clients a SPEC names, the link each
hosted client's connection gets, and running the clients' Workers in threads.

Each client is a `Worker` with its own state and its own `Connection` (its own gRPC channel, and its own
relay where its link is shaped); they share the task (`task.for_clients`). When one fails, the others
are stopped (`Worker.stop`: each leaves the run) and `run_clients` raises `ClientsFailed`, naming the
client that failed and why. Loads no torch: the CLI parses a SPEC before it reaches the server.
"""
from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..common.errors import ConfigError, EfmuonError
from .connection import WorkerStopped

if TYPE_CHECKING:
    from ..common.config import RunConfig
    from ..common.links import LinkProfile
    from .client import Worker

log = logging.getLogger("efmuon.worker")

MAX_CLIENTS = 4096  # the most clients one SPEC may name (one process runs a thread per client)


def parse_clients(spec: str) -> list[int]:
    """'0-15' or '0,3,5-7' -> the sorted client ids (each >= 0, none twice); a ConfigError names what is wrong."""
    text = (spec or "").strip()
    if not text:
        raise ConfigError("--clients is empty: give client ids like 0-15 or 0,3,5-7")
    out: list[int] = []
    for part in text.split(","):
        item = part.strip()
        lo, sep, hi = item.partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise ConfigError(f"--clients {spec!r}: {item!r} is not a client id or a range A-B of ids >= 0 "
                              "(e.g. 0-15 or 0,3,5-7)")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ConfigError(f"--clients {spec!r}: the range {item!r} runs backwards (give {b}-{a})")
        if b - a + 1 + len(out) > MAX_CLIENTS:
            raise ConfigError(f"--clients {spec!r} names more than {MAX_CLIENTS} clients for one process")
        out.extend(range(a, b + 1))
    seen: set[int] = set()
    twice = sorted({j for j in out if j in seen or seen.add(j)})
    if twice:
        raise ConfigError(f"--clients {spec!r} names client {format_clients(twice)} more than once")
    return sorted(out)


def format_clients(ids) -> str:
    """The SPEC of sorted client ids: [0, 1, 2, 5] -> '0-2,5'."""
    ids = sorted(ids)
    parts, i = [], 0
    while i < len(ids):
        k = i
        while k + 1 < len(ids) and ids[k + 1] == ids[k] + 1:
            k += 1
        parts.append(str(ids[i]) if k == i else f"{ids[i]}-{ids[k]}")
        i = k + 1
    return ",".join(parts)


def config_links(cfg: RunConfig) -> list[LinkProfile] | None:
    """Every client's link from the run configuration (`federation.client_links`, exactly the profiles
    `efmuon simulate` gives), or None when the run has no links or emulates them otherwise (netns)."""
    from ..common import federation  # lazy: it imports the tasks (torch)

    if not federation.has_links(cfg) or cfg.shaping not in (None, "inproc"):
        return None
    return [prof for _, prof in federation.client_links(cfg, federation.federation_size(cfg))]


def client_link(links: list[LinkProfile] | None, j: int | None, explicit: LinkProfile | None):
    """The link client j's connection is shaped with: the explicit --link where given, else its profile
    from the run configuration (`config_links`) when it is shaped, else None (a direct connection)."""
    if explicit is not None:
        return explicit
    if links is None or j is None:
        return None
    if not 0 <= j < len(links):
        raise ConfigError(f"client {j} is not one of the run's clients 0..{len(links) - 1}")
    return links[j] if links[j].is_shaped else None


class ClientsFailed(EfmuonError):
    """A client hosted in this process failed; the others were stopped. `failed`: {client: error}."""

    def __init__(self, message: str, failed: dict[int, BaseException]):
        super().__init__(message)
        self.failed = failed


def run_clients(workers: Mapping[int, Worker], poll_s: float = 0.5) -> dict[int, dict]:
    """Run every worker in its own thread; returns {client: stats} once all finished. When one fails, the
    others are stopped (each leaves) and ClientsFailed says which client failed and why; Ctrl-C stops
    them all and is raised again."""
    if not workers:
        return {}
    results: dict[int, dict] = {}
    errors: dict[int, BaseException] = {}
    first: list[int] = []
    lock = threading.Lock()
    finished = threading.Event()

    def stop_others(j: int, exc: BaseException) -> None:
        reason = f"client {j} in the same process failed: {exc}"
        for i, w in workers.items():
            if i != j:
                w.stop(reason)

    def body(j: int, w: Worker) -> None:
        try:
            stats = w.run()
            with lock:
                results[j] = stats
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread (ClientsFailed)
            with lock:
                errors[j] = exc
                primary = not first and not isinstance(exc, WorkerStopped)
                if primary:
                    first.append(j)
            if primary:
                if not isinstance(exc, EfmuonError):
                    log.error("client %d failed:\n%s", j, "".join(traceback.format_exception(exc)))
                stop_others(j, exc)
        finally:
            with lock:
                if len(results) + len(errors) == len(workers):
                    finished.set()

    threads = [threading.Thread(target=body, args=(j, w), name=f"efmuon-client-{j}", daemon=True)
               for j, w in workers.items()]
    for t in threads:
        t.start()
    try:
        while not finished.wait(poll_s):
            pass
    except KeyboardInterrupt:
        for w in workers.values():
            w.stop("interrupted")
        for t in threads:
            t.join(30)
        raise
    for t in threads:
        t.join()
    if errors:
        j = first[0] if first else min(errors)
        stopped = sorted(i for i, e in errors.items() if i != j)
        also = f"; stopped the other clients of this process ({format_clients(stopped)})" if stopped else ""
        raise ClientsFailed(f"client {j} failed: {errors[j]}{also}", errors)
    return results

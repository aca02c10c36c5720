"""What operators expect of a server: gRPC health checking, server reflection and Prometheus metrics.

- Health (`grpc.health.v1.Health`): "" and "efmuon.v1.ParameterServer" are SERVING while the run
  accepts clients (Status state WAITING or RUNNING) and NOT_SERVING once it is finished, stopping or
  failed, so an orchestrator's probe (a Kubernetes gRPC probe, `grpc_health_probe`) sees the truth.
  The health service needs no bearer token (`HEALTH_METHODS` are exempt from `--token-file`: probes
  send none); under mutual TLS the handshake still wants a client certificate the CA signed.
- Reflection (`grpc.reflection.v1alpha`) lists ParameterServer, Health and itself (grpcurl,
  grpc_cli). It is an ordinary RPC: with `--token-file` it needs a token like any other.
- Metrics (`--metrics-port P`): prometheus_client's own HTTP server on the gRPC server's host
  (HTTPS with the server's certificate when it serves TLS), one `CollectorRegistry` per server.
  The run's figures (round, losses, bytes, clients, checkpoint) are read at scrape time on the
  event loop's thread, where they change, so a scrape never sees half a round; once the loop is gone
  the last figures stay. Refusals by code, re-syncs and round times are counted as they happen.

Byte counters are the report's: `efmuon_bytes_total{direction,level}` is summary.bytes and
`efmuon_client_bytes_total{client,direction,level}` summary.client_bytes once the run is over;
while it runs they also count the rounds whose figures are not in the report yet (the clients'
wire bytes arrive one call late, docs/design.md §5).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..common.errors import ConfigError
from ..common.report import add_bytes, zero_bytes
from ..v1 import service_pb2 as pb
from .status import run_state

if TYPE_CHECKING:
    import grpc

    from .coordinator import Coordinator

log = logging.getLogger("efmuon.server")

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name  # efmuon.v1.ParameterServer
HEALTH_SERVICE = health.SERVICE_NAME  # grpc.health.v1.Health
# the health RPCs a probe may call without a token (TokenAuthInterceptor's `exempt`)
HEALTH_METHODS = tuple(f"/{HEALTH_SERVICE}/{m.name}"
                       for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods)
HEALTH_NAMES = ("", SERVICE)  # the names a health check may ask about ("" = the server as a whole)
SERVING_STATES = (pb.StatusReply.STATE_WAITING, pb.StatusReply.STATE_RUNNING)

SCRAPE_WAIT = 2.0  # seconds a scrape waits for the event loop before it answers with the last figures
ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0,
                 float("inf"))


def is_serving(c: Coordinator) -> bool:
    """True while the run accepts clients: Status's state is WAITING or RUNNING."""
    return run_state(c) in SERVING_STATES


def bytes_so_far(c: Coordinator) -> tuple[dict, dict[str, dict]]:
    """(totals, per client) of every byte recorded: the report's and those of rounds not reported yet."""
    totals = {d: dict(v) for d, v in c.report.totals.items()}
    clients = {j: {d: dict(v) for d, v in b.items()} for j, b in c.ledger.client_bytes.items()}
    for per_client in c.ledger.open.values():
        for j, figures in per_client.items():
            add_bytes(totals, figures)
            add_bytes(clients.setdefault(str(j), zero_bytes(True)), figures)
    return totals, clients


def run_figures(c: Coordinator) -> dict:
    """What the scrape-time metrics show, read from the Coordinator (on the event loop's thread)."""
    totals, clients = bytes_so_far(c)
    return {"round": c.collecting, "rounds": c.rounds, "completed": min(max(c.collecting - 1, 0), c.rounds),
            "workers": c.n, "connected": len(c.live_clients()), "loss_w": c.loss_w, "loss_x": c.loss_x,
            "checkpoint_round": c.checkpoint_round, "serving": is_serving(c), "bytes": totals,
            "clients": clients, "nonfinite_zeroed": c.nonfinite_zeroed, "partial_rounds": c.partial_rounds}


class _RunCollector:
    """The scrape-time metrics: families built from `Observability.figures()`."""

    def __init__(self, owner: Observability):
        self.owner = owner

    def describe(self):  # the names only: registering must not read the run
        return self._families(None)

    def collect(self):
        return self._families(self.owner.figures())

    @staticmethod
    def _families(f: dict | None) -> list:
        def gauge(name: str, doc: str, key: str):
            g = GaugeMetricFamily(name, doc)
            if f is not None and f[key] is not None:
                g.add_metric([], float(f[key]))
            return g

        def counter(name: str, doc: str, key: str):
            m = CounterMetricFamily(name, doc)
            if f is not None:
                m.add_metric([], float(f[key]))
            return m

        out = [
            gauge("efmuon_round", "the round being collected (0 = the initial submission), as Status.round", "round"),
            gauge("efmuon_rounds", "the rounds of the run", "rounds"),
            counter("efmuon_rounds_completed", "rounds processed (aggregate, evaluate, step) so far", "completed"),
            gauge("efmuon_workers", "the clients the run needs (--workers)", "workers"),
            gauge("efmuon_clients_connected", "clients whose Join completed and who have not left", "connected"),
            gauge("efmuon_loss_w", "the last evaluated loss at W", "loss_w"),
            gauge("efmuon_loss_x", "the last evaluated loss at X", "loss_x"),
            gauge("efmuon_checkpoint_round", "the round of the last checkpoint (0: none yet)", "checkpoint_round"),
            gauge("efmuon_serving", "1 while the run accepts clients (health SERVING), else 0", "serving"),
            counter("efmuon_nonfinite_zeroed", "non-finite uplink values replaced by 0 (--nan-policy zero)",
                    "nonfinite_zeroed"),
            counter("efmuon_partial_rounds", "rounds that proceeded without every client (--on-deadline proceed)",
                    "partial_rounds"),
        ]
        total = CounterMetricFamily("efmuon_bytes", "bytes by direction and level (payload: compressor frames, "
                                    "message: serialized protobuf, wire: the clients' TCP bytes)",
                                    labels=["direction", "level"])
        per_client = CounterMetricFamily("efmuon_client_bytes", "bytes by client, direction and level",
                                         labels=["client", "direction", "level"])
        if f is not None:
            for d, levels in f["bytes"].items():
                for lvl, v in levels.items():
                    if v is not None:
                        total.add_metric([d, lvl], float(v))
            for j, b in sorted(f["clients"].items(), key=lambda item: int(item[0])):
                for d, levels in b.items():
                    for lvl, v in levels.items():
                        if v is not None:
                            per_client.add_metric([j, d, lvl], float(v))
        return [*out, total, per_client]


class Observability:
    """Health, reflection and metrics of one server (module docstring). Made by `service.start`, which
    installs it on the grpc.aio server and sets it as `coordinator.observer`; the Coordinator calls
    `update` when the run's state changes and `round_end` after each round, the servicer `rejected`
    and `resynced`. Everything but `figures` (any thread) runs on the event loop's thread."""

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        self._loop = asyncio.get_running_loop()
        self.health = health.aio.HealthServicer()
        self._serving: bool | None = None
        self._tasks: set[asyncio.Task] = set()
        self.registry = CollectorRegistry()
        self.rejected_requests = Counter("efmuon_rejected_requests", "requests refused (by the servicer or the "
                                         "auth interceptors), by gRPC status code (their sum is Status.rejected)",
                                         ["code"],
                                         registry=self.registry)
        self.resyncs = Counter("efmuon_resyncs", "re-syncs: Joins answered with the server's W (and G_j), and "
                               "Exchanges answered 'join again'", ["rpc"], registry=self.registry)
        self.round_seconds = Histogram("efmuon_round_seconds", "seconds per round (the report's round seconds)",
                                       buckets=ROUND_BUCKETS, registry=self.registry)
        self.last_round_seconds = Gauge("efmuon_last_round_seconds", "the last round's seconds",
                                        registry=self.registry)
        self._last: dict = run_figures(coordinator)
        self.registry.register(_RunCollector(self))
        self.http = None
        self.metrics_port: int | None = None
        self.metrics_url: str | None = None

    async def install(self, server: grpc.aio.Server) -> None:
        """Add the health service (with the run's status) and reflection to `server` (before it starts)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        self._serving = is_serving(self.c)
        await self._set_health()

    # ------------------------------------------------------------------ the run's state
    def update(self, c: Coordinator) -> None:
        """The run's state may have changed (a round ended, it is stopping or failed): health follows."""
        self._last = run_figures(c)
        serving = self._last["serving"]
        if serving != self._serving:
            self._serving = serving
            task = asyncio.get_running_loop().create_task(self._set_health())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def round_end(self, c: Coordinator, seconds: float | None) -> None:
        """A round was processed and its reply released; `seconds`: its report seconds (None for round 0)."""
        if seconds is not None:
            self.round_seconds.observe(seconds)
            self.last_round_seconds.set(seconds)
        self.update(c)

    def rejected(self, code: str) -> None:
        """The servicer refused a request with status `code` (a grpc.StatusCode name)."""
        self.rejected_requests.labels(code=code).inc()

    def resynced(self, rpc: str) -> None:
        self.resyncs.labels(rpc=rpc).inc()

    async def _set_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self._serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in HEALTH_NAMES:
            await self.health.set(name, status)

    # ------------------------------------------------------------------ metrics
    def figures(self) -> dict:
        """The run's figures now (`run_figures`), read on the event loop's thread; from another thread
        (a scrape) the loop is asked, and the last figures are used when it is gone or busy."""
        loop = self._loop
        if loop.is_closed():
            return self._last
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            self._last = run_figures(self.c)
            return self._last
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def take() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    self._last = run_figures(self.c)
                    fut.set_result(self._last)
                except BaseException as exc:  # noqa: BLE001 - the scrape reports it
                    fut.set_exception(exc)
        try:
            loop.call_soon_threadsafe(take)
            return fut.result(SCRAPE_WAIT)
        except (RuntimeError, concurrent.futures.TimeoutError):  # the loop closed, stopped or is busy
            fut.cancel()
            return self._last

    def serve_metrics(self, host: str, port: int, certfile: str | None = None, keyfile: str | None = None) -> int:
        """Serve the registry on http(s)://host:port/metrics (port 0: any free one, printed); returns the port.
        Raises ConfigError when it cannot listen there."""
        if not 0 <= port <= 65535:
            raise ConfigError(f"--metrics-port {port} is not a TCP port: give 0..65535 (0: any free port)")
        try:
            self.http, _ = start_http_server(port, addr=host, registry=self.registry, certfile=certfile,
                                             keyfile=keyfile)
        except OSError as exc:
            raise ConfigError(f"could not serve metrics on {host}:{port} ({exc.strerror or exc}): the port is in "
                              "use or the host is not an address of this machine; pick another --metrics-port "
                              "(0: any free port)") from None
        self.metrics_port = int(self.http.server_port)
        shown = f"[{host}]" if ":" in host else host
        self.metrics_url = f"{'https' if certfile else 'http'}://{shown}:{self.metrics_port}/metrics"
        print(f"efmuon server: metrics on {self.metrics_url}", file=sys.stderr, flush=True)
        return self.metrics_port

    async def close(self) -> None:
        """The server stopped: keep the last figures, report NOT_SERVING to any watcher, stop serving metrics."""
        self._last = run_figures(self.c)
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            http, self.http = self.http, None
            await asyncio.to_thread(http.shutdown)
            http.server_close()


__all__ = ["HEALTH_METHODS", "HEALTH_SERVICE", "SERVICE", "Observability", "bytes_so_far", "is_serving",
           "run_figures"]

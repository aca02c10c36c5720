"""What operators expect of a running server: gRPC health checking (SERVING while the run accepts
clients, NOT_SERVING once it is over or stopping; no token needed, with TLS and tokens on), server
reflection, and Prometheus metrics on --metrics-port whose counters advance with the run and end
equal to the report."""
from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from contextlib import asynccontextmanager

import grpc
import pytest
from conftest import Harness, make_cfg, run_workers
from efmuon.cli import build_parser
from efmuon.cli.service import options_from_args
from efmuon.common.errors import ConfigError
from efmuon.common.wire import protocol
from efmuon.common.wire.credentials import auth_metadata, channel_credentials, read_token
from efmuon.server.certs import make_dev_certs
from efmuon.server.observability import HEALTH_SERVICE, SERVICE
from efmuon.server.options import ServerOptions
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------------------------------------- helpers
def parse(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def scrape(url: str, ca=None) -> str:
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        assert response.status == 200
        return response.read().decode()


async def scrape_async(url: str, ca=None) -> dict:
    return parse(await asyncio.to_thread(scrape, url, ca))  # not on the loop: the scrape reads the run there


async def health_status(channel, service: str = "", metadata=()) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=10, metadata=metadata)
    return reply.status


async def reflected_services(channel, metadata=()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                     timeout=10, metadata=metadata)
    return [s.name async for r in call for s in r.list_services_response.service]


def byte_levels(summary_bytes: dict):
    for d, levels in summary_bytes.items():
        for lvl, v in levels.items():
            if v is not None:
                yield d, lvl, v


@asynccontextmanager
async def observed(cfg, options: ServerOptions, evaluate=None):
    """A Harness whose observer (health, metrics) is closed at the end (its HTTP server too)."""
    async with Harness(cfg, evaluate=evaluate, options=options) as h:
        try:
            yield h, h.coordinator.observer
        finally:
            await h.coordinator.observer.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("obs-certs")
    make_dev_certs(d, clients=2, quiet=True)
    return d


# ---------------------------------------------------------------------------------------------- in process
async def test_health_reflection_and_metrics_follow_a_run_and_end_equal_to_the_report():
    # Prepare
    cfg = make_cfg(workers=2, rounds=3)

    def evaluate(W, X):  # losses the metrics must carry: any function of W and X
        return {"loss_w": float(sum(w.double().square().sum() for w in W)),
                "loss_x": float(sum(x.double().square().sum() for x in X))}

    async with observed(cfg, ServerOptions(metrics_port=0, round_deadline=60), evaluate) as (h, obs):
        samples: list[dict] = []  # the registry as a scrape would see it, at the end of each round's processing
        h.coordinator.events = lambda kind, k, t0, t1: (
            samples.append(parse(generate_latest(obs.registry).decode())) if kind == "process" else None)
        before = await scrape_async(obs.metrics_url)
        statuses = [await health_status(h.channel, name) for name in ("", SERVICE)]
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health_status(h.channel, "no.such.Service")
        services = await reflected_services(h.channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # not joined: FAILED_PRECONDITION, counted
            await h.raw_exchange(0, "not-a-session", 0, [])
        watched = health_pb2_grpc.HealthStub(h.channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE),
                                                              timeout=120)
        first_watched = (await watched.read()).status

        # Execute
        await run_workers(h.worker(0), h.worker(1))
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
        after_watched = (await watched.read()).status
        watched.cancel()
        after = [await health_status(h.channel, name) for name in ("", SERVICE)]
        end = await scrape_async(obs.metrics_url)
        summary = h.coordinator.report.summary

    # Assert: health and reflection
    assert statuses == [SERVING, SERVING] and first_watched == SERVING
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert after == [NOT_SERVING, NOT_SERVING] and after_watched == NOT_SERVING
    assert {SERVICE, HEALTH_SERVICE, "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    # before the run: nothing yet
    assert value(before, "efmuon_round") == 0 and value(before, "efmuon_rounds") == 3
    assert value(before, "efmuon_rounds_completed_total") == 0 and value(before, "efmuon_serving") == 1
    assert value(before, "efmuon_bytes_total", direction="up", level="payload") == 0
    assert value(before, "efmuon_loss_w") is None  # not evaluated yet: no sample
    # as the run proceeds: one sample per processed round (0 = the initial submission .. 3)
    assert [value(s, "efmuon_rounds_completed_total") for s in samples] == [0, 1, 2, 3]
    assert [value(s, "efmuon_round") for s in samples] == [1, 2, 3, 4]
    assert [value(s, "efmuon_serving") for s in samples] == [1, 1, 1, 0]  # finished after the last round
    for d in ("up", "down"):
        payload = [value(s, "efmuon_bytes_total", direction=d, level="payload") for s in samples]
        assert all(a < b for a, b in zip(payload, payload[1:])), (d, payload)
    assert [value(s, "efmuon_round_seconds_count") for s in samples] == [0, 1, 2, 3]
    # at the end: the report's figures, payload bytes exactly (and every other level too)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert value(end, "efmuon_rejected_requests_total", code="FAILED_PRECONDITION") == 1
    assert summary["resilience"]["rejected_requests"] == 1
    assert value(end, "efmuon_rounds_completed_total") == summary["rounds"] == 3
    for d, lvl, v in byte_levels(summary["bytes"]):
        assert value(end, "efmuon_bytes_total", direction=d, level=lvl) == v, (d, lvl)
    assert set(summary["client_bytes"]) == {"0", "1"}
    for j, b in summary["client_bytes"].items():
        for d, lvl, v in byte_levels(b):
            assert value(end, "efmuon_client_bytes_total", client=j, direction=d, level=lvl) == v, (j, d, lvl)
    assert value(end, "efmuon_loss_w") == summary["final_loss_w"] and summary["final_loss_w"] > 0
    assert value(end, "efmuon_loss_x") == summary["final_loss_x"]
    assert [value(s, "efmuon_loss_w") for s in samples[1:]] == [r["loss_w"] for r in h.coordinator.report.rounds]
    assert value(end, "efmuon_round_seconds_count") == 3 and value(end, "efmuon_last_round_seconds") >= 0
    assert value(end, "efmuon_clients_connected") == 0 and value(end, "efmuon_serving") == 0


async def test_a_stopped_run_is_not_serving_and_its_last_figures_stay():
    # Prepare
    cfg = make_cfg(workers=2, rounds=3)
    async with observed(cfg, ServerOptions(metrics_port=0)) as (h, obs):
        serving = await health_status(h.channel, SERVICE)

        # Execute
        await h.coordinator.stop()
        stopped = [await health_status(h.channel, name) for name in ("", SERVICE)]
        metrics = await scrape_async(obs.metrics_url)
    after_close = parse(generate_latest(obs.registry).decode())  # the loop's figures are kept

    # Assert
    assert serving == SERVING and stopped == [NOT_SERVING, NOT_SERVING]
    assert value(metrics, "efmuon_serving") == 0 and value(after_close, "efmuon_serving") == 0
    assert value(after_close, "efmuon_round") == 0


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_health_needs_no_token_under_tls_and_tokens(certs, mutual):
    # Prepare
    cfg = make_cfg(workers=2, rounds=2)
    opts = ServerOptions(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                         tls_ca=str(certs / "ca.pem") if mutual else None, token_file=str(certs / "tokens.txt"),
                         metrics_port=0)
    client = (certs / "client-0.pem", certs / "client-0.key") if mutual else (None, None)
    token = auth_metadata(read_token(certs / "client-0.token"))
    async with observed(cfg, opts) as (h, obs):
        channel = grpc.aio.secure_channel(f"localhost:{h.port}", channel_credentials(certs / "ca.pem", *client),
                                          options=protocol.CHANNEL_OPTIONS)
        try:
            # Execute
            statuses = [await health_status(channel, name) for name in ("", SERVICE)]
            with pytest.raises(grpc.aio.AioRpcError) as status_refused:  # only health is exempt from tokens
                await pb_grpc.ParameterServerStub(channel).Status(pb.StatusRequest(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as reflection_refused:
                await reflected_services(channel)
            services = await reflected_services(channel, token)
            metrics = await scrape_async(obs.metrics_url, ca=certs / "ca.pem")
        finally:
            await channel.close()

    # Assert
    assert statuses == [SERVING, SERVING]
    assert status_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reflection_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert SERVICE in services and HEALTH_SERVICE in services
    assert obs.metrics_url.startswith("https://")
    assert value(metrics, "efmuon_serving") == 1 and value(metrics, "efmuon_workers") == 2
    # the token interceptor's refusals are counted with the servicer's, by code
    assert value(metrics, "efmuon_rejected_requests_total", code="UNAUTHENTICATED") == 2


def test_metrics_port_flag_of_server_and_run():
    # Prepare
    parser = build_parser()

    # Execute
    server = options_from_args(parser.parse_args(["server", "--metrics-port", "0"]))
    run = options_from_args(parser.parse_args(["run", "--metrics-port", "9464"]))
    default = options_from_args(parser.parse_args(["server"]))

    # Assert
    assert (server.metrics_port, run.metrics_port, default.metrics_port) == (0, 9464, None)
    with pytest.raises(ConfigError, match="--metrics-port 70000 is not a TCP port"):
        options_from_args(parser.parse_args(["server", "--metrics-port", "70000"]))


# ---------------------------------------------------------------------------------------------- efmuon server
def wait_for(pattern: str, log_path, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout  # a hang guard, not a measurement
    while time.monotonic() < deadline:
        m = re.search(pattern, log_path.read_text())
        if m:
            return m
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never appeared: {log_path.read_text()}")


def poll_metrics(url: str, ca, proc: subprocess.Popen, until, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout  # a hang guard, not a measurement
    while time.monotonic() < deadline:
        metrics = parse(scrape(url, ca))
        if until(metrics):
            return metrics
        assert proc.poll() is None
        time.sleep(0.1)
    raise AssertionError(f"the metrics never showed what was awaited: {metrics}")


@pytest.mark.slow
def test_efmuon_server_with_tls_tokens_and_metrics(certs, tmp_path):
    # Prepare
    log_path = tmp_path / "server.log"
    ca = certs / "ca.pem"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "efmuon.cli", "server", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
             "--task", "lsq", "--workers", "2", "--rounds", "3", "--tls-cert", str(certs / "server.pem"),
             "--tls-key", str(certs / "server.key"), "--token-file", str(certs / "tokens.txt"),
             "--report", str(tmp_path / "report.json")], stdout=log, stderr=subprocess.STDOUT, text=True)
    workers: list[subprocess.Popen] = []

    def worker(j: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "efmuon.cli", "worker", "--server", f"127.0.0.1:{port}",
                                 "--client-id", str(j), "--tls-ca", str(ca), "--token-file",
                                 str(certs / f"client-{j}.token"), "--quiet"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    try:
        port = int(wait_for(r"listening on 127\.0\.0\.1:(\d+)", log_path, server).group(1))
        url = wait_for(r"metrics on (https://127\.0\.0\.1:\d+/metrics)", log_path, server).group(1)
        channel = grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(ca))
        try:
            health = health_pb2_grpc.HealthStub(channel)
            waiting = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status  # no token

            # Execute: one worker joins (round 0 waits for the other), then the other; the run ends
            before = parse(scrape(url, ca))
            workers.append(worker(0))
            joined = poll_metrics(url, ca, server, lambda m: value(m, "efmuon_clients_connected") == 1 and
                                  value(m, "efmuon_bytes_total", direction="up", level="payload"))
            still = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        finally:
            channel.close()
        workers.append(worker(1))
        outputs = [w.communicate(timeout=120)[0] for w in workers]
        code = server.wait(timeout=120)
    finally:
        for p in (server, *workers):
            if p.poll() is None:
                p.kill()
    report = json.loads((tmp_path / "report.json").read_text())

    # Assert
    assert code == 0, log_path.read_text()
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert waiting == SERVING and still == SERVING
    assert value(before, "efmuon_round") == 0 and value(before, "efmuon_clients_connected") == 0
    assert value(before, "efmuon_bytes_total", direction="down", level="payload") == 0
    # the counters advanced with the join and the initial submission, and stay within the report's totals
    for d in ("up", "down"):
        got = value(joined, "efmuon_bytes_total", direction=d, level="payload")
        assert 0 < got <= report["summary"]["bytes"][d]["payload"], d
    assert value(joined, "efmuon_round") == 0 and value(joined, "efmuon_serving") == 1
    assert report["summary"]["rounds"] == 3

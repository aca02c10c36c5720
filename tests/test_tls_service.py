"""TLS (server certificate, mutual TLS) and per-client bearer tokens on a live server: no token, a
wrong token, another client's token or an untrusted CA is refused; the right ones train, in process
and through `efmuon run`."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
from conftest import batches_of, loss_fn, make_cfg, reference_w, server_model, tiny_model
from efmuon.common.wire import protocol
from efmuon.common.wire.credentials import auth_metadata, read_token
from efmuon.server import service
from efmuon.server.certs import make_dev_certs
from efmuon.server.coordinator import Coordinator, ServerOptions
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc
from efmuon.worker import Worker, WorkerError
from efmuon.worker.security import Security


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    make_dev_certs(d / "good", clients=2, quiet=True)
    make_dev_certs(d / "other", clients=1, quiet=True)  # another CA: not trusted by the server
    return d


def secure_stub(certs, ca="good", client_cert: int | None = 0):
    from efmuon.common.wire.credentials import channel_credentials

    good = certs / "good"
    cert = key = None
    if client_cert is not None:
        cert, key = certs / ca / f"client-{client_cert}.pem", certs / ca / f"client-{client_cert}.key"
    creds = channel_credentials(certs / ca / "ca.pem", cert, key)
    return lambda port: grpc.aio.secure_channel(f"localhost:{port}", creds, options=protocol.CHANNEL_OPTIONS), good


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_tls_and_tokens_refuse_strangers_and_train_the_right_clients(certs, mutual):
    # Prepare
    good = certs / "good"
    cfg = make_cfg(workers=2, rounds=3)
    opts = ServerOptions(tls_cert=str(good / "server.pem"), tls_key=str(good / "server.key"),
                         tls_ca=str(good / "ca.pem") if mutual else None, token_file=str(good / "tokens.txt"),
                         round_deadline=30)
    coordinator = Coordinator(cfg, server_model(cfg), quiet=True, leave_timeout=5, options=opts)
    server, port = await service.start(coordinator)
    tokens = [read_token(good / f"client-{j}.token") for j in range(2)]

    async def status(channel_factory, metadata=()):
        channel = channel_factory(port)
        try:
            await pb_grpc.ParameterServerStub(channel).Status(pb.StatusRequest(), timeout=5, metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            await channel.close()

    try:
        trusted, _ = secure_stub(certs, "good", 0 if mutual else None)
        # Execute / Assert: strangers
        assert await status(trusted) == grpc.StatusCode.UNAUTHENTICATED  # no token
        assert await status(trusted, auth_metadata("x" * 40)) == grpc.StatusCode.UNAUTHENTICATED  # wrong token
        assert await status(trusted, auth_metadata(tokens[0])) == grpc.StatusCode.OK
        untrusted, _ = secure_stub(certs, "other", 0 if mutual else None)  # the client does not trust the server
        assert await status(untrusted, auth_metadata(tokens[0])) == grpc.StatusCode.UNAVAILABLE
        plain = lambda p: grpc.aio.insecure_channel(f"localhost:{p}", options=protocol.CHANNEL_OPTIONS)  # noqa: E731
        assert await status(plain, auth_metadata(tokens[0])) == grpc.StatusCode.UNAVAILABLE  # no TLS at all
        if mutual:  # a client certificate from another CA, or none, is refused by the handshake
            foreign = lambda p: grpc.aio.secure_channel(  # noqa: E731
                f"localhost:{p}", __import__("efmuon.common.wire.credentials", fromlist=["x"]).channel_credentials(
                    good / "ca.pem", certs / "other" / "client-0.pem", certs / "other" / "client-0.key"))
            assert await status(foreign, auth_metadata(tokens[0])) == grpc.StatusCode.UNAVAILABLE
            nocert, _ = secure_stub(certs, "good", None)
            assert await status(nocert, auth_metadata(tokens[0])) == grpc.StatusCode.UNAVAILABLE

        def security(j: int, token: str) -> Security:
            return Security(tls_ca=str(good / "ca.pem"), token=token,
                            tls_cert=str(good / f"client-{j}.pem") if mutual else None,
                            tls_key=str(good / f"client-{j}.key") if mutual else None)

        def worker(j: int, token: str) -> Worker:
            from efmuon.worker.client import Connection

            conn = Connection(f"localhost:{port}", measure_wire=True, security=security(j, token))
            return Worker(tiny_model(), loss_fn, batches_of(j), server=conn, client_id=j, configure_threads=False,
                          reconnect_timeout=0)

        # client 0's token used by client 1: PERMISSION_DENIED at Join
        with pytest.raises(WorkerError) as stolen:
            await asyncio.to_thread(worker(1, tokens[0]).run)
        # the right ones train, through the byte-counting relay (TLS records are counted on the wire)
        stats = await asyncio.gather(*(asyncio.to_thread(worker(j, tokens[j]).run) for j in range(2)))
        await asyncio.wait_for(coordinator.finished.wait(), 20)
    finally:
        await server.stop(0)
        coordinator.executor.shutdown(wait=True)

    assert stolen.value.code == grpc.StatusCode.PERMISSION_DENIED and "belongs to client 0" in str(stolen.value)
    expected = reference_w(cfg)
    assert coordinator.report.summary["w_sha256"] == expected
    assert [s["w_sha256"] for s in stats] == [expected, expected]
    assert coordinator.report.summary["bytes"]["up"]["wire"] > coordinator.report.summary["bytes"]["up"]["message"]


@pytest.mark.slow
def test_efmuon_run_with_tls_and_tokens(certs, tmp_path):
    good = certs / "good"
    out = subprocess.run([sys.executable, "-m", "efmuon.cli", "run", "--task", "lsq", "--workers", "2",
                          "--rounds", "4", "--tls-cert", str(good / "server.pem"), "--tls-key", str(good / "server.key"),
                          "--tls-ca", str(good / "ca.pem"), "--token-file", str(good / "tokens.txt"),
                          "--report", str(tmp_path / "r.json"), "--plots", "none"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["rounds"] == 4

"""Operations security with real processes and sockets: plaintext off loopback is never silent (server
and worker need --insecure, and then warn), a mutual-TLS client certificate is tied to its client id,
and startup mistakes (a port in use, bad --port/--host, bad TLS files, a negative --client-id) end in
one line `efmuon COMMAND: error: ...` with exit code 2. Every test listens on 127.0.0.1 only, except
servers that refuse before binding or that nothing connects to but over 127.0.0.1."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import socket
import subprocess
import sys
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from efmuon.common.errors import ConfigError
from efmuon.common.wire import protocol
from efmuon.common.wire.credentials import auth_metadata, channel_credentials, read_token
from efmuon.server import auth, service
from efmuon.server.certs import make_dev_certs
from efmuon.server.coordinator import Coordinator, ServerOptions
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc
from efmuon.worker import Worker, WorkerError
from efmuon.worker.client import Connection
from efmuon.worker.security import Security, check_transport, is_loopback_host
from test_service_protocol import batches_of, loss_fn, make_cfg, reference_w, server_model, tiny_model

from conftest import CLI

RUN = ["--task", "lsq", "--workers", "2", "--rounds", "3", "--uplink", "topk:0.2", "--downlink", "natural"]
TOKEN = "t" * 32


def efmuon(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(out: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr: `efmuon COMMAND: error: ...`, no traceback."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and out.stdout == "", out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"efmuon {command}: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def popen_server(args: list[str], log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([*CLI, "server", *args], stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for_port(log_path, proc: subprocess.Popen, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"listening on [0-9.]+:(\d+)", log_path.read_text())
        if m:
            return int(m.group(1))
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"server did not start: {log_path.read_text()}")


def worker_procs(port: int, flag_sets: list[list[str]]) -> list[subprocess.Popen]:
    return [subprocess.Popen([*CLI, "worker", "--server", f"127.0.0.1:{port}", "--reconnect-timeout", "0", *flags],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for flags in flag_sets]


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    make_dev_certs(d / "good", clients=2, quiet=True)
    make_dev_certs(d / "other", clients=1, quiet=True)
    _sign_leaf(d / "good", "nobody", "efmuon-monitor")  # signed by the CA, but names no client
    return d


def _sign_leaf(d, base: str, cn: str) -> None:
    """A client certificate `base`.pem/.key with CN and DNS name `cn`, signed by d/ca.pem."""
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / f"{base}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{base}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))


# ------------------------------------------------------------------ 2. plaintext off loopback
@pytest.mark.slow
def test_server_refuses_plaintext_off_loopback_unless_insecure_and_then_warns(tmp_path):
    # Execute / Assert: the default --host 0.0.0.0 and an explicit one, without TLS: refused before binding
    for host in ([], ["--host", "0.0.0.0"]):
        line = assert_one_error_line(efmuon("server", *RUN, "--port", "0", *host), "server", "plaintext",
                                     "0.0.0.0", "--insecure", "--tls-cert")
        assert "not a loopback address" in line

    # Execute: --insecure serves (on every interface) and warns; the run trains over 127.0.0.1
    log_path = tmp_path / "server.log"
    server = popen_server(["--host", "0.0.0.0", "--insecure", "--port", "0", *RUN,
                           "--report", str(tmp_path / "r.json")], log_path)
    workers = []
    try:
        port = wait_for_port(log_path, server)
        workers = worker_procs(port, [["--client-id", "0"], ["--client-id", "1"]])
        outputs = [w.communicate(timeout=120)[0] for w in workers]
        code = server.wait(timeout=60)
    finally:
        stop(server, *workers)

    # Assert
    text = log_path.read_text()
    assert code == 0 and [w.returncode for w in workers] == [0, 0], (text, outputs)
    assert "serving PLAINTEXT on 0.0.0.0 (--insecure)" in text
    assert "anyone on the path can read or alter" in text
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["rounds"] == 3


def test_loopback_needs_no_insecure_flag():
    # Assert: the addresses `efmuon run` and the tests use stay allowed without --insecure
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST."))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "10.1.2.3", "::", "example.org", "localhost.example"))


def test_worker_refuses_a_token_without_tls_off_loopback_unless_insecure(tmp_path, caplog):
    token_file = tmp_path / "w.token"
    token_file.write_text(f"0 {TOKEN}\n")
    token_file.chmod(0o600)

    # Execute / Assert: through the CLI (refused before any connection is made)
    for how in (["--token", TOKEN], ["--token-file", str(token_file)]):
        out = efmuon("worker", "--server", "10.1.2.3:50051", "--client-id", "0", *how, timeout=60)
        assert_one_error_line(out, "worker", "token without TLS", "10.1.2.3", "--tls-ca", "--insecure")

    # Execute / Assert: --insecure allows it with a warning naming the risk; TLS or loopback need nothing
    with caplog.at_level(logging.WARNING, logger="efmuon.worker"):
        check_transport("10.1.2.3", Security(token=TOKEN, insecure=True))
    assert "PLAINTEXT (--insecure)" in caplog.text and "read and reuse it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="efmuon.worker"):
        check_transport("10.1.2.3", Security(token=TOKEN, tls_ca=str(tmp_path / "ca.pem")))
        check_transport("127.0.0.1", Security(token=TOKEN))
        check_transport("10.1.2.3", None)
    assert caplog.text == ""
    with pytest.raises(ConfigError, match="refusing to send a token without TLS"):
        Connection("10.1.2.3:50051", measure_wire=False, security=Security(token=TOKEN))


# ------------------------------------------------------------------ 3. mutual TLS: certificate <-> client id
def _mtls_flags(good, j: int | None, cert: str, token: int) -> list[str]:
    ids = [] if j is None else ["--client-id", str(j)]
    return [*ids, "--tls-ca", str(good / "ca.pem"), "--tls-cert", str(good / f"{cert}.pem"),
            "--tls-key", str(good / f"{cert}.key"), "--token-file", str(good / f"client-{token}.token")]


@pytest.mark.slow
def test_mtls_certificate_of_another_client_is_refused_and_the_right_pairs_train(certs, tmp_path):
    # Prepare: `efmuon server` with mutual TLS and per-client tokens, on 127.0.0.1
    good = certs / "good"
    log_path = tmp_path / "server.log"
    server = popen_server(["--host", "127.0.0.1", "--port", "0", *RUN, "--tls-cert", str(good / "server.pem"),
                           "--tls-key", str(good / "server.key"), "--tls-ca", str(good / "ca.pem"),
                           "--token-file", str(good / "tokens.txt"), "--report", str(tmp_path / "r.json")], log_path)
    workers = []
    try:
        port = wait_for_port(log_path, server)
        # Execute: client 1's certificate with client 0's token and id; then one without any client identity
        stolen = worker_procs(port, [_mtls_flags(good, 0, "client-1", 0)])[0]
        stolen_out = stolen.communicate(timeout=120)[0]
        nobody = worker_procs(port, [_mtls_flags(good, 0, "nobody", 0)])[0]
        nobody_out = nobody.communicate(timeout=120)[0]
        # the right pairs: client 0 by --client-id, client 1 given its id by its certificate (no --client-id)
        workers = worker_procs(port, [_mtls_flags(good, 0, "client-0", 0), _mtls_flags(good, None, "client-1", 1)])
        outputs = [w.communicate(timeout=120)[0] for w in workers]
        code = server.wait(timeout=60)
    finally:
        stop(server, *workers)

    # Assert
    text = log_path.read_text()
    assert stolen.returncode == 2 and "PERMISSION_DENIED" in stolen_out, stolen_out
    assert "this client certificate belongs to client 1; it cannot act as client 0" in stolen_out
    assert nobody.returncode == 2 and "PERMISSION_DENIED" in nobody_out, nobody_out
    assert "names no client" in nobody_out and "client-J or efmuon-client-J" in nobody_out
    assert code == 0 and [w.returncode for w in workers] == [0, 0], (text, outputs)
    assert outputs[1].count("worker 1:") == 1  # the worker without --client-id became client 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["rounds"] == 3 and all(report["summary"]["w_sha256"] in o for o in outputs)


async def test_mtls_exchange_and_leave_must_act_as_the_certificates_client(certs):
    # Prepare: an in-process server with mutual TLS and tokens, on 127.0.0.1
    good = certs / "good"
    cfg = make_cfg(workers=2, rounds=2)
    opts = ServerOptions(tls_cert=str(good / "server.pem"), tls_key=str(good / "server.key"),
                         tls_ca=str(good / "ca.pem"), token_file=str(good / "tokens.txt"), round_deadline=30)
    coordinator = Coordinator(cfg, server_model(cfg), quiet=True, leave_timeout=5, options=opts)
    server, port = await service.start(coordinator)
    tokens = [read_token(good / f"client-{j}.token") for j in range(2)]

    def channel(cert: str):
        creds = channel_credentials(good / "ca.pem", good / f"{cert}.pem", good / f"{cert}.key")
        return grpc.aio.secure_channel(f"localhost:{port}", creds, options=protocol.CHANNEL_OPTIONS)

    async def code_of(call) -> tuple[grpc.StatusCode, str]:
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""

    try:
        async with channel("client-1") as ch1, channel("nobody") as nobody:
            stub, md = pb_grpc.ParameterServerStub(ch1), auth_metadata(tokens[1])
            header = pb.Submission(header=pb.SubmissionHeader(client_id=0, session="s", round=0))

            async def exchange():
                return [m async for m in stub.Exchange(iter([header, pb.Submission(chunk=b"x" * 100)]),
                                                       metadata=md, timeout=10)]

            # Execute
            exchanged = await code_of(exchange)
            left = await code_of(lambda: stub.Leave(pb.LeaveRequest(client_id=0, session="s"), metadata=md,
                                                    timeout=10))
            anonymous = await code_of(lambda: pb_grpc.ParameterServerStub(nobody).Leave(
                pb.LeaveRequest(client_id=0, session="s"), metadata=auth_metadata(tokens[0]), timeout=10))
            status = await code_of(lambda: stub.Status(pb.StatusRequest(), metadata=md, timeout=10))

        def worker(j: int, cert: str, token: int) -> Worker:
            sec = Security(tls_ca=str(good / "ca.pem"), tls_cert=str(good / f"{cert}.pem"),
                           tls_key=str(good / f"{cert}.key"), token=tokens[token])
            conn = Connection(f"localhost:{port}", measure_wire=False, security=sec)
            return Worker(tiny_model(), loss_fn, batches_of(j), server=conn, client_id=j, configure_threads=False,
                          reconnect_timeout=0)

        with pytest.raises(WorkerError) as stolen:  # client 1's certificate and token, acting as client 0
            await asyncio.to_thread(worker(0, "client-1", 1).run)
        stats = await asyncio.gather(*(asyncio.to_thread(worker(j, f"client-{j}", j).run) for j in range(2)))
        await asyncio.wait_for(coordinator.finished.wait(), 30)
    finally:
        await server.stop(0)
        coordinator.executor.shutdown(wait=True)

    # Assert: refused at the edge, naming both ids; nothing reached the run; the right pairs train
    for code, details in (exchanged, left):
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
        assert "belongs to client 1; it cannot act as client 0" in details
    assert anonymous[0] == grpc.StatusCode.PERMISSION_DENIED and auth.NO_CLIENT_IDENTITY in anonymous[1]
    assert status[0] == grpc.StatusCode.OK  # Status claims no client id
    assert stolen.value.code == grpc.StatusCode.PERMISSION_DENIED and "cannot act as client 0" in str(stolen.value)
    assert coordinator.report.summary["w_sha256"] == reference_w(cfg)
    assert [s["w_sha256"] for s in stats] == [reference_w(cfg)] * 2


# ------------------------------------------------------------------ 6. startup mistakes, one port one server
@pytest.mark.slow
def test_a_second_server_on_a_port_in_use_is_refused_and_the_first_carries_on(tmp_path):
    # Prepare: a first server, and a plain listening socket (another program)
    log_path = tmp_path / "first.log"
    first = popen_server(["--host", "127.0.0.1", "--port", "0", *RUN, "--report", str(tmp_path / "r.json")],
                         log_path)
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    workers = []
    try:
        port = wait_for_port(log_path, first)

        # Execute / Assert: a second efmuon server on the first's port, and on the other program's
        for p in (port, other.getsockname()[1]):
            for host in (["--host", "127.0.0.1"], ["--host", "0.0.0.0", "--insecure"]):
                out = efmuon("server", *RUN, *host, "--port", str(p))
                assert_one_error_line(out, "server", f"port {p}", "already in use", "another --port")

        # Execute: the first still serves its run
        workers = worker_procs(port, [["--client-id", "0"], ["--client-id", "1"]])
        outputs = [w.communicate(timeout=120)[0] for w in workers]
        code = first.wait(timeout=60)
    finally:
        other.close()
        stop(first, *workers)

    # Assert
    assert code == 0 and [w.returncode for w in workers] == [0, 0], (log_path.read_text(), outputs)
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["rounds"] == 3


async def test_grpc_never_shares_a_port_between_two_servers():
    # Prepare: two coordinators; the first listens on a free port
    cfg = make_cfg(workers=1, rounds=1)
    first, second = (Coordinator(cfg, server_model(cfg), quiet=True) for _ in range(2))
    server, port = await service.start(first)
    try:
        # Execute / Assert: gRPC's SO_REUSEPORT would let the second bind it too; start() refuses
        with pytest.raises(ConfigError, match=f"could not listen on 127.0.0.1:{port}: the port is in use"):
            await service.start(second, "127.0.0.1", port)
        with pytest.raises(ConfigError, match="port 70000 is not a TCP port"):
            await service.start(second, "127.0.0.1", 70000)
    finally:
        await server.stop(0)
        for c in (first, second):
            c.executor.shutdown(wait=True)


@pytest.mark.parametrize("case", ["port-high", "port-negative", "host-999", "host-unknown", "key-mismatch",
                                  "cert-missing", "cert-unreadable", "worker-client-id", "worker-connect-timeout"])
def test_startup_mistakes_are_one_line_and_exit_2(certs, case):
    good, other = certs / "good", certs / "other"
    tls = ["--host", "127.0.0.1", "--port", "0", "--tls-key"]
    args, needles = {
        "port-high": (["server", "--host", "127.0.0.1", "--port", "99999"], ["--port 99999", "0..65535"]),
        "port-negative": (["server", "--host", "127.0.0.1", "--port", "-5"], ["--port -5", "0..65535"]),
        "host-999": (["server", "--host", "999.1.1.1", "--port", "0"], ["--host '999.1.1.1' is not an address"]),
        "host-unknown": (["server", "--host", "no-such-host.invalid", "--port", "0"],
                         ["--host 'no-such-host.invalid' is not an address"]),
        "key-mismatch": (["server", *tls, str(other / "server.key"), "--tls-cert", str(good / "server.pem")],
                         ["does not belong to the certificate", "other"]),
        "cert-missing": (["server", *tls, str(good / "server.key"), "--tls-cert", str(good / "missing.pem")],
                         ["missing.pem' does not exist"]),
        "cert-unreadable": (["server", *tls, str(good / "server.key"), "--tls-cert", str(good)],  # a directory
                            ["cannot be read"]),
        "worker-client-id": (["worker", "--server", "127.0.0.1:1", "--client-id", "-1"], ["--client-id -1", "0..n-1"]),
        "worker-connect-timeout": (["worker", "--server", "127.0.0.1:1", "--connect-timeout", "nan"],
                                   ["--connect-timeout nan is not a time"]),
    }[case]

    # Execute
    out = efmuon(*args, *(RUN if args[0] == "server" else []), timeout=90)

    # Assert
    assert_one_error_line(out, args[0], *needles)


def test_startup_mistakes_are_refused_before_torch_is_imported(certs):
    """A wrong --port, --host or TLS file, or a bad worker flag, fails before the model (and torch) is
    loaded: the user hears of it at once, not after seconds of start-up."""
    good = certs / "good"
    probe = ("import sys; from efmuon.cli import main; code = main(sys.argv[1:]); "
             "print('torch' in sys.modules); sys.exit(code)")
    for args in (["server", "--host", "127.0.0.1", "--port", "99999"],
                 ["server", "--host", "127.0.0.1", "--port", "0", "--tls-cert", str(good / "missing.pem"),
                  "--tls-key", str(good / "server.key")],
                 ["worker", "--server", "127.0.0.1:1", "--client-id", "-1"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stdout.strip() == "False", (args, out.stdout, out.stderr)

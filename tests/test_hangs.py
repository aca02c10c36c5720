"""No silent hangs. A worker whose server stopped answering (SIGSTOP: its host vanished without closing
the connection) exits once its --reconnect-timeout is spent; the workers of a SIGKILLed `efmuon run`
end with it; nothing listening, or a TLS mistake on either side, is named (which side refused what)
and a TLS mistake is not retried. Real server and worker processes on 127.0.0.1, TLS material from
`efmuon certs` (and an expired server certificate signed by its CA).

Time bounds here are hang guards only, far below the 300 s a worker re-joins for by default."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from efmuon.server.certs import make_dev_certs
from efmuon.worker import Worker, WorkerError
from efmuon.worker.connection import Connection
from efmuon.worker.security import Security
from efmuon.worker.silence import SILENCE_S
from conftest import CLI, free_port, start

FLAGS = ["--task", "lsq", "--workers", "2", "--rounds", "5"]
HANG_GUARD = 120.0  # seconds; a worker that ignored its timeouts would live 300 s (the default) or forever


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def server(port: int, log: Path, *extra: str) -> subprocess.Popen:
    return start(["server", "--host", "127.0.0.1", "--port", str(port), *FLAGS, *extra], log)


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait(timeout=30)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead child its new parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# ---------------------------------------------------------------------------- a server that vanished
@pytest.mark.slow
def test_a_stopped_server_ends_its_worker_once_the_reconnect_timeout_is_spent(tmp_path):
    # Prepare: one worker of two joined, so it waits in round 0's Exchange at the barrier
    port = free_port()
    srv = server(port, tmp_path / "server.log")
    log = tmp_path / "worker.log"
    worker = None
    try:
        wait_for(lambda: "listening on" in (tmp_path / "server.log").read_text(), srv, tmp_path / "server.log")
        # --client-wire: through the relay, whose counters the silence watchdog reads (25 s); a direct
        # worker (the default) notices by gRPC's keepalive instead, within 10 + 60 s
        worker = start(["worker", "--server", f"127.0.0.1:{port}", "--client-id", "0", "--reconnect-timeout", "5",
                        "--client-wire"], log)
        wait_for(lambda: "joined as client 0" in log.read_text(), worker, log)

        # Execute: the server's host "vanishes" (stopped, its connections left open)
        srv.send_signal(signal.SIGSTOP)
        try:
            # the silence is noticed after SILENCE_S (worker.silence), then 5 s of re-joining
            code = worker.wait(timeout=SILENCE_S + 5 + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker outlived its --reconnect-timeout 5 by far:\n{log.read_text()[-3000:]}")
    finally:
        stop(srv, *([worker] if worker is not None else []))

    # Assert
    out = log.read_text()
    assert code != 0, out
    assert f"the server at 127.0.0.1:{port} stopped answering" in out, out
    assert "did not come back within 5 s (--reconnect-timeout)" in out, out


@pytest.mark.slow
def test_the_workers_of_a_killed_efmuon_run_end_with_it(tmp_path):
    # Prepare: a run far too long to finish, its worker processes started and connected
    log = tmp_path / "run.log"
    run = start(["run", "--task", "lsq", "--workers", "2", "--rounds", "100000", "--plots", "none",
                 "--report", str(tmp_path / "r.json")], log)
    try:
        wait_for(lambda: "loss_w" in log.read_text(), run, log)  # rounds done: the workers are connected
        # every process below the run (the workers, and the zygote they were forked from)
        spawned = descendants(run.pid)
        assert len([p for p in spawned if "efmuon" in cmdline(p)]) >= 2, [cmdline(p) for p in spawned]

        # Execute: SIGKILL leaves no chance to stop them
        run.kill()
        run.wait(timeout=30)
        deadline = time.monotonic() + 30  # orphans would re-join for the 300 s default
        while any(alive(p) for p in spawned) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in spawned if alive(p)]
    finally:
        stop(run)
        for p in descendants(run.pid):
            os.kill(p, signal.SIGKILL)

    # Assert
    assert survivors == [], f"processes {survivors} outlived `efmuon run`:\n{log.read_text()[-3000:]}"


# ---------------------------------------------------------------------------- TLS mistakes, nothing listening
def expired_server_certificate(directory: Path) -> tuple[Path, Path]:
    """A server certificate for localhost/127.0.0.1 signed by the CA in `directory`, expired yesterday."""
    x509 = pytest.importorskip("cryptography.x509")  # optional: efmuon certs falls back to openssl
    from cryptography.hazmat.primitives import hashes, serialization  # lazy: optional cryptography
    from cryptography.hazmat.primitives.asymmetric import ec  # lazy: optional cryptography
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # lazy: optional cryptography

    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem, pkey = directory / "expired.pem", directory / "expired.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkey.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return pem, pkey


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Servers on 127.0.0.1 without TLS, with TLS, with mutual TLS, with a certificate for another host
    name and with an expired certificate: {name: port}, and the directory of the certificate directories
    good (the servers' CA), other (another CA) and elsewhere (a server certificate for example.org)."""
    tmp = tmp_path_factory.mktemp("hangs")
    good, other, elsewhere = tmp / "good", tmp / "other", tmp / "elsewhere"
    make_dev_certs(good, clients=1, tokens=False, quiet=True)
    make_dev_certs(other, clients=1, tokens=False, quiet=True)  # another CA
    make_dev_certs(elsewhere, hosts=["example.org"], clients=0, tokens=False, quiet=True)
    expired, expired_key = expired_server_certificate(good)
    tls = lambda d, cert="server.pem", key="server.key": ["--tls-cert", str(d / cert), "--tls-key", str(d / key)]  # noqa: E731
    flags = {"plain": [], "tls": tls(good), "mtls": tls(good) + ["--tls-ca", str(good / "ca.pem")],
             "elsewhere": tls(elsewhere), "expired": ["--tls-cert", str(expired), "--tls-key", str(expired_key)]}
    ports = {name: free_port() for name in flags}
    procs = {name: server(ports[name], tmp / f"{name}.log", *f) for name, f in flags.items()}
    try:
        for name, p in procs.items():
            wait_for(lambda n=name: "listening on" in (tmp / f"{n}.log").read_text(), p, tmp / f"{name}.log")
        yield ports, tmp
    finally:
        stop(*procs.values())


def cases(certs: Path) -> dict[str, tuple[str, list[str], list[str]]]:
    """name: (server, worker flags, what the worker's error must say)."""
    good, other = certs / "good", certs / "other"
    ca = ["--tls-ca", str(good / "ca.pem")]
    return {
        "plain-worker-tls-server": ("tls", [], ["speaks TLS and this worker does not", "--tls-ca"]),
        "tls-worker-plain-server": ("plain", ca, ["does not speak TLS", "start the server with --tls-cert"]),
        "untrusted-ca": ("tls", ["--tls-ca", str(other / "ca.pem")],
                         ["this worker rejected the certificate of the server", "not signed by the CA this worker trusts"]),
        "wrong-host-name": ("elsewhere", ["--tls-ca", str(certs / "elsewhere" / "ca.pem")], ["this worker rejected the certificate of the server",
                                              "not made for '127.0.0.1'", "--host 127.0.0.1"]),
        "expired": ("expired", ca, ["this worker rejected the certificate of the server", "has expired"]),
        "mtls-no-client-certificate": ("mtls", ca, ["rejected this worker in the TLS handshake",
                                                    "requires a client certificate", "--tls-cert"]),
        "mtls-foreign-client-certificate": ("mtls", ca + ["--tls-cert", str(other / "client-0.pem"), "--tls-key",
                                                          str(other / "client-0.key")],
                                            ["rejected this worker's client certificate", "not signed by the CA"]),
    }


@pytest.mark.slow
def test_tls_mistakes_and_nothing_listening_are_named_and_tls_is_not_retried(servers, tmp_path):
    # Prepare
    ports, certs = servers
    table = cases(certs)
    nobody = free_port()

    # Execute: every worker at once (each fails on its own)
    procs = {}
    for name, (srv, flags, _) in table.items():
        procs[name] = start(["worker", "--server", f"127.0.0.1:{ports[srv]}", "--client-id", "0", *flags],
                            tmp_path / f"{name}.log")
    procs["nothing-listens"] = start(["worker", "--server", f"127.0.0.1:{nobody}", "--client-id", "0",
                                      "--connect-timeout", "5"], tmp_path / "nothing-listens.log")
    codes = {}
    try:
        for name, p in procs.items():
            try:
                codes[name] = p.wait(timeout=HANG_GUARD)
            except subprocess.TimeoutExpired:
                codes[name] = None
    finally:
        stop(*procs.values())

    # Assert
    for name, (_, _, says) in table.items():
        out = (tmp_path / f"{name}.log").read_text()
        assert codes[name] not in (0, None), f"{name}: {out[-3000:]}"
        error = [line for line in out.splitlines() if line.startswith("efmuon worker: error:")]
        assert len(error) == 1, f"{name}: {out[-3000:]}"
        for words in says:
            assert words in error[0], f"{name}: {error[0]}"
        assert "trying again" not in out, f"{name} was retried: {out[-3000:]}"  # a TLS mistake is permanent
    out = (tmp_path / "nothing-listens.log").read_text()
    assert codes["nothing-listens"] not in (0, None), out
    assert f"nothing listens on 127.0.0.1:{nobody}: is the server running? (tried for 5 s)" in out, out
    assert out.index("nothing listens") < out.index("efmuon worker: error:")  # said at once, before giving up


@pytest.mark.slow
def test_a_worker_object_names_an_untrusted_server_certificate_at_its_first_join(servers):
    # Prepare: the Worker API (its first Join, not the CLI's Status) through the byte-counting relay
    ports, certs = servers
    conn = Connection(f"127.0.0.1:{ports['tls']}", measure_wire=True,
                      security=Security(tls_ca=str(certs / "other" / "ca.pem")))
    model = torch.nn.Linear(2, 1)
    worker = Worker(model, lambda m, b: m(b).sum(), batches=[torch.ones(1, 2)], server=conn, client_id=0,
                    configure_threads=False, reconnect_timeout=300)

    # Execute
    with pytest.raises(WorkerError) as failed:
        worker.run()

    # Assert: permanent, so not retried for the 300 s
    assert "this worker rejected the certificate of the server" in str(failed.value)
    assert "not signed by the CA this worker trusts" in str(failed.value)


def test_a_server_host_that_does_not_resolve_is_one_clear_line(tmp_path):
    out = subprocess.run(CLI + ["worker", "--server", "no-such-host.invalid:50051", "--client-id", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "no-such-host.invalid" in out.stderr and "does not resolve" in out.stderr
    assert "Traceback" not in out.stderr

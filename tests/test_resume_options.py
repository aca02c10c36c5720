"""A resumed server keeps what protected and shaped the run it continues, and a new run never starts over
silently on an old one's checkpoints. Real `efmuon server` / `efmuon worker` processes, real TLS and tokens.

- security: a server checkpointed with TLS + tokens and resumed with only `--resume DIR` serves TLS + tokens
  again (the checkpoint stores the files' paths and sha256, never their contents); a stranger is refused,
  the workers reconnect and finish. A security file changed since is refused with its flag named.
- options: `--checkpoint-every` (and the other server options) come back with the run; resuming a named
  round-NNNNNN writes new checkpoints into its run directory, never inside the old checkpoint.
- a `--checkpoint-dir` holding an earlier run is refused without --resume / --fresh; --fresh starts over.
"""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from efmuon.common.checkpoint import latest_checkpoint, list_checkpoints
from efmuon.common.wire.credentials import auth_metadata, channel_credentials, read_token
from efmuon.server.certs import make_dev_certs
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc
from conftest import CLI, free_port, start

FLAGS = ["--task", "lsq", "--workers", "2", "--rounds", "40", "--uplink", "topk:0.2", "--downlink", "natural"]


def wait_for(pred, proc: subprocess.Popen, log: Path, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.01)


def checkpointed_round(d: Path) -> int:
    try:
        found = latest_checkpoint(d)
    except Exception:  # noqa: BLE001 - being written
        return -1
    return -1 if found is None else int(found.name.split("-")[1])


async def status_code(port: int, creds=None, metadata=()) -> grpc.StatusCode:
    target = f"localhost:{port}"
    channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
    try:
        await pb_grpc.ParameterServerStub(channel).Status(pb.StatusRequest(), timeout=5, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close()


@pytest.fixture
def certs(tmp_path) -> Path:
    d = tmp_path / "certs"
    make_dev_certs(str(d), hosts=("localhost", "127.0.0.1"), clients=2, tokens=True)
    return d


def secure_server(port, tmp, certs, *extra) -> subprocess.Popen:
    return start(["server", "--host", "127.0.0.1", "--port", str(port), *FLAGS, "--report", str(tmp / "net.json"),
                  "--plots", "none", *extra], tmp / "server.log")


def secure_worker(port, j, tmp, certs) -> subprocess.Popen:
    return start(["worker", "--server", f"localhost:{port}", "--client-id", str(j), "--tls-ca", str(certs / "ca.pem"),
                  "--token-file", str(certs / f"client-{j}.token"), "--reconnect-timeout", "120"],
                 tmp / f"worker{j}.log")


@pytest.mark.slow
def test_resume_keeps_tls_tokens_and_checkpoint_every_and_refuses_a_stranger(tmp_path, certs):
    # Prepare: a TLS + token server checkpointing every round, two workers
    port, ckpt = free_port(), tmp_path / "ckpt"
    security = ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                "--token-file", str(certs / "tokens.txt")]
    first = secure_server(port, tmp_path, certs, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1",
                          *security)
    workers = [secure_worker(port, j, tmp_path, certs) for j in range(2)]
    second = None
    try:
        wait_for(lambda: checkpointed_round(ckpt) >= 3, first, tmp_path / "server.log", what="round 3")
        # Execute: SIGKILL, then resume with --resume naming the newest checkpoint itself and NO security flag
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        named = latest_checkpoint(ckpt)
        killed_at = int(named.name.split("-")[1])
        time.sleep(3.0)  # an outage: the resumed rounds must not count it
        t_resumed = time.monotonic()
        second = secure_server(port, tmp_path, certs, "--resume", str(named))
        wait_for(lambda: "listening on" in (tmp_path / "server.log").read_text().split("resum")[-1], second,
                 tmp_path / "server.log", what="the resumed server listening")
        # Assert: plaintext gets nothing; TLS without a token is unauthenticated; TLS + a token is served
        tls = channel_credentials(str(certs / "ca.pem"))
        token = read_token(str(certs / "client-0.token"), 0)
        assert asyncio.run(status_code(port)) == grpc.StatusCode.UNAVAILABLE
        assert asyncio.run(status_code(port, tls)) == grpc.StatusCode.UNAUTHENTICATED
        assert asyncio.run(status_code(port, tls, auth_metadata("x" * 32))) == grpc.StatusCode.UNAUTHENTICATED
        assert asyncio.run(status_code(port, tls, auth_metadata(token))) == grpc.StatusCode.OK
        codes = [w.wait(180) for w in workers] + [second.wait(60)]
        resumed_lifetime = time.monotonic() - t_resumed
    finally:
        for p in [first, *workers] + ([second] if second else []):
            if p.poll() is None:
                p.kill()
    log = (tmp_path / "server.log").read_text()
    assert codes == [0, 0, 0], log[-3000:]
    assert f"new checkpoints go to {ckpt}" in log
    report = json.loads((tmp_path / "net.json").read_text())
    assert report["summary"]["rounds"] == 40
    assert report["summary"]["resilience"]["resumed_from"] == str(named)
    # the outage before the resume is in no round's seconds: each resumed round took at most the resumed
    # server's own lifetime (a relation between two clocks of this run, not a wall-clock figure)
    resumed = [r for r in report["rounds"] if r["round"] > killed_at]
    assert resumed and all(0 <= r["seconds"] <= resumed_lifetime for r in resumed)
    # --checkpoint-every 1 came back with the run: the kept checkpoints are consecutive, up to the last round,
    # and they are in the run directory, none inside the checkpoint the run was resumed from
    kept = [r for r, _ in list_checkpoints(ckpt)]
    assert kept == list(range(kept[-1] - len(kept) + 1, kept[-1] + 1)) and kept[-1] >= 40 and kept[0] > killed_at
    assert not list_checkpoints(named)


@pytest.mark.slow
def test_resume_refuses_a_security_file_changed_since(tmp_path, certs):
    # Prepare: a short TLS + token run that checkpoints at its end
    ckpt, port = tmp_path / "ckpt", free_port()
    srv = secure_server(port, tmp_path, certs, "--checkpoint-dir", str(ckpt), "--tls-cert", str(certs / "server.pem"),
                        "--tls-key", str(certs / "server.key"), "--token-file", str(certs / "tokens.txt"),
                        "--rounds", "3")
    workers = [secure_worker(port, j, tmp_path, certs) for j in range(2)]
    assert [w.wait(180) for w in workers] + [srv.wait(60)] == [0, 0, 0], (tmp_path / "server.log").read_text()
    # Execute: the token file changes (a token added), then --resume without the security flags
    with open(certs / "tokens.txt", "a") as fh:
        fh.write("* " + "y" * 32 + "\n")
    out = subprocess.run(CLI + ["server", "--host", "127.0.0.1", "--port", "0", "--resume", str(ckpt)],
                         capture_output=True, text=True, timeout=120)
    # Assert: refused, naming the flag and the file; nothing served
    assert out.returncode == 2, out.stderr
    assert "--token-file" in out.stderr and "tokens.txt" in out.stderr and "changed" in out.stderr
    assert "listening on" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_directory_with_an_earlier_run_needs_resume_or_fresh(tmp_path):
    # Prepare: a finished run that left checkpoints (simulated clients are not needed: `efmuon run`)
    ckpt = tmp_path / "ckpt"
    run = ["run", *FLAGS, "--rounds", "4", "--plots", "none", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"]
    first = subprocess.run(CLI + run, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = list_checkpoints(ckpt)
    assert before
    # Execute + Assert: the same command again is refused, naming both ways out; nothing is deleted
    again = subprocess.run(CLI + run, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "--resume" in again.stderr and "--fresh" in again.stderr and "Traceback" not in again.stderr
    assert list_checkpoints(ckpt) == before
    # ... and with --fresh the new run starts over (round 1 again) and its checkpoints replace the old ones
    fresh = subprocess.run(CLI + run + ["--fresh", "--rounds", "2", "--report", str(tmp_path / "fresh.json")],
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert [r for r, _ in list_checkpoints(ckpt)] == [1, 2]
    assert json.loads((tmp_path / "fresh.json").read_text())["summary"]["rounds"] == 2

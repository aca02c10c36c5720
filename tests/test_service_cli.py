"""`efmuon server` and `efmuon worker` as separate processes (the multi-machine pieces), and a
graceful stop on SIGTERM."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import efmuon_cli

FLAGS = ["--task", "lsq", "--workers", "2", "--rounds", "5", "--uplink", "topk:0.2", "--downlink", "natural"]


def efmuon_popen(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "efmuon.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_port(log_path, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"listening on [0-9.]+:(\d+)", log_path.read_text())
        if m:
            return int(m.group(1))
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"server did not start: {log_path.read_text()}")


@pytest.mark.slow
def test_server_and_worker_commands_match_simulate(tmp_path):
    # Prepare
    server_log = tmp_path / "server.log"
    with open(server_log, "w") as log:
        server = efmuon_popen(["server", "--host", "127.0.0.1", "--port", "0", *FLAGS,
                               "--report", str(tmp_path / "net.json")], log)
    try:
        port = wait_for_port(server_log, server)

        # Execute
        workers = [subprocess.Popen([sys.executable, "-m", "efmuon.cli", "worker", "--server",
                                     f"127.0.0.1:{port}", "--client-id", str(j)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
                   for j in range(2)]
        outputs = [w.communicate(timeout=120)[0] for w in workers]
        assert server.wait(timeout=60) == 0, server_log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
    efmuon_cli("simulate", *FLAGS, "--report", str(tmp_path / "sim.json"))

    # Assert
    assert [w.returncode for w in workers] == [0, 0], outputs
    net = json.loads((tmp_path / "net.json").read_text())
    ref = json.loads((tmp_path / "sim.json").read_text())
    assert net["summary"]["w_sha256"] == ref["summary"]["w_sha256"]
    assert all(net["summary"]["w_sha256"] in out for out in outputs)  # each worker ends holding that W
    assert "client 0 joined" in server_log.read_text()


@pytest.mark.slow
def test_sigterm_stops_the_server_gracefully_with_a_partial_report(tmp_path):
    # Prepare: a run of 2 workers where only one ever joins
    server_log = tmp_path / "server.log"
    with open(server_log, "w") as log:
        server = efmuon_popen(["server", "--host", "127.0.0.1", "--port", "0", *FLAGS,
                               "--report", str(tmp_path / "partial.json")], log)
    try:
        port = wait_for_port(server_log, server)
        # (a worker waits --reconnect-timeout for a server to come back; this one is not resumable)
        worker = subprocess.Popen([sys.executable, "-m", "efmuon.worker", "--server", f"127.0.0.1:{port}",
                                   "--client-id", "0", "--reconnect-timeout", "5"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while "client 0 joined" not in server_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)

        # Execute
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)  # a hang guard (a stop that sat out the 30 s leave timeout trips it)
        worker_out = worker.communicate(timeout=30)[0]
    finally:
        for p in (server, worker):
            if p.poll() is None:
                p.kill()

    # Assert
    assert code == 130, server_log.read_text()  # interrupted, after writing what it had
    report = json.loads((tmp_path / "partial.json").read_text())
    assert report["summary"]["partial"] is True and report["rounds"] == []
    assert worker.returncode == 2 and "efmuon worker: error" in worker_out, worker_out

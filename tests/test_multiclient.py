"""Many clients per process: one `efmuon worker --clients 0-5` process hosting a whole 6-client run, and
`efmuon run --clients-per-process K` starting ceil(n / K) such processes, end in `efmuon simulate`'s W bit
for bit; a bad SPEC is a clear error before anything starts; links from the run configuration (a
--link-mix) shape each hosted client's own connection; one failing client stops the others. Real
processes and real gRPC over 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time

import pytest
from conftest import CLI, Harness, batches_of, loss_fn, make_cfg, tiny_model
from efmuon.cli import main
from efmuon.common.config import RunConfig
from efmuon.common.federation import client_links
from efmuon.worker import Worker, WorkerStopped
from efmuon.worker.hosting import (
    ClientsFailed,
    format_clients,
    parse_clients,
    run_clients,
)

FLAGS = ["--task", "digits", "--workers", "6", "--rounds", "4", "--uplink", "topk:0.2", "--downlink", "natural"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def efmuon(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, check=False)


def summary(path) -> dict:
    return json.loads(path.read_text())["summary"]


_simulated: dict = {}


def simulated_w(tmp_path) -> str:
    """w_sha256 of `efmuon simulate` with FLAGS (in this process; once per pytest worker)."""
    if "w" not in _simulated:
        out = tmp_path / "sim.json"
        assert main(["simulate", *FLAGS, "--report", str(out), "--plots", "none"]) == 0
        _simulated["w"] = summary(out)["w_sha256"]
    return _simulated["w"]


def start_server(port: int, flags: list[str], tmp_path, log) -> subprocess.Popen:
    with open(log, "w") as fh:  # the server writes to its own copy of the descriptor
        return subprocess.Popen(CLI + ["server", "--host", "127.0.0.1", "--port", str(port), *flags,
                                       "--report", str(tmp_path / "net.json"), "--plots", "none"],
                                stdout=fh, stderr=subprocess.STDOUT, text=True)


def wait_listening(proc: subprocess.Popen, log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "listening on" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)


def test_parse_clients_spec():
    assert parse_clients("0-15") == list(range(16))
    assert parse_clients("0,3,5-7") == [0, 3, 5, 6, 7]
    assert parse_clients(" 7 , 2-3 ") == [2, 3, 7]
    assert format_clients([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.mark.parametrize("spec, word", [
    ("", "empty"), ("3-1", "runs backwards"), ("a", "'a' is not a client id"), ("0,2,1-2", "client 2 more than once"),
    ("1-", "'1-' is not"), ("-1", "'-1' is not"), ("0-99999", "more than 4096"),
])
def test_bad_clients_spec_is_a_clear_error_before_anything_starts(spec, word, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the worker tried to reach the server")

    monkeypatch.setattr("efmuon.worker.reconnect.reach", never)
    assert main(["worker", "--server", "127.0.0.1:1", "--clients", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("efmuon worker: error: --clients") and word in err, err


def test_bad_clients_spec_exits_2_at_once_from_the_command_line():
    out = efmuon("worker", "--server", "127.0.0.1:1", "--clients", "0-3,x", timeout=30)
    assert out.returncode == 2 and "'x' is not a client id" in out.stderr, out.stderr
    both = efmuon("worker", "--server", "127.0.0.1:1", "--clients", "0-3", "--client-id", "1", timeout=30)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr, both.stderr


@pytest.mark.slow
def test_one_process_hosting_six_clients_matches_simulate(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    server = start_server(port, FLAGS, tmp_path, log)
    try:
        wait_listening(server, log)
        worker = efmuon("worker", "--server", f"127.0.0.1:{port}", "--clients", "0-5", "--quiet",
                        "--stats", str(tmp_path / "stats.json"))
        assert worker.returncode == 0, worker.stderr
        assert server.wait(60) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
    want = simulated_w(tmp_path)
    assert summary(tmp_path / "net.json")["w_sha256"] == want
    stats = json.loads((tmp_path / "stats.json").read_text())["clients"]
    assert sorted(stats, key=int) == [str(j) for j in range(6)]
    for j, st in stats.items():
        assert st["client_id"] == int(j) and st["w_sha256"] == want and st["rounds"] == 4 and st["link"] is None


@pytest.mark.slow
def test_run_starts_ceil_n_over_k_processes_and_matches_simulate(tmp_path):
    out = efmuon("run", *FLAGS, "--clients-per-process", "4", "--report", str(tmp_path / "run.json"),
                 "--plots", "none")
    assert out.returncode == 0, out.stderr
    assert "6 clients in 2 worker processes" in out.stdout
    s = summary(tmp_path / "run.json")
    procs = s["worker_processes"]
    assert [p["clients"] for p in procs] == ["0-3", "4-5"] and len({p["pid"] for p in procs}) == 2
    assert s["w_sha256"] == simulated_w(tmp_path)


@pytest.mark.slow
def test_link_mix_shapes_each_hosted_client_as_client_links_gives(tmp_path):
    mix = "dsl=0.5,wifi=0.5"
    out = efmuon("run", "--task", "digits", "--workers", "4", "--rounds", "2", "--link-mix", mix,
                 "--clients-per-process", "2", "--report", str(tmp_path / "mix.json"), "--plots", "none")
    assert out.returncode == 0, out.stderr
    s = summary(tmp_path / "mix.json")
    assert [p["clients"] for p in s["worker_processes"]] == ["0-1", "2-3"]
    want = client_links(RunConfig(task="digits", workers=4, link_mix=mix), 4)
    assert sorted(s["links"], key=int) == ["0", "1", "2", "3"]
    for j, (name, prof) in enumerate(want):
        got = s["links"][str(j)]
        assert got["profile"] == name and got["mechanism"] == "relay"
        assert got["up"]["configured_bps"] == prof.up_bps and got["down"]["configured_bps"] == prof.down_bps
        assert got["delay_s"] == prof.delay_s
        # timed by the client's own relay in its worker process: its connection went through the shaper. (Not
        # the join's downlink: once, at load 11, it had no timed transfer of >= 64 KiB; the join's rate is
        # informational, reported apart from the rounds', and not what this test is about.)
        assert got["up"]["transfers"] >= 1


@pytest.mark.slow
def test_a_failing_client_stops_the_others_and_the_process_names_it(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    flags = ["--task", "digits", "--workers", "2", "--rounds", "500"]
    server = start_server(port, flags, tmp_path, log)
    try:
        wait_listening(server, log)
        # client 2 is not one of the run's clients 0..1: its Join is refused, clients 0 and 1 are stopped
        worker = efmuon("worker", "--server", f"127.0.0.1:{port}", "--clients", "0-2", "--quiet")
        assert worker.returncode == 2, worker.stderr
        assert "efmuon worker: error: client 2 failed:" in worker.stderr, worker.stderr
        assert "stopped the other clients of this process (0-1)" in worker.stderr, worker.stderr
    finally:
        server.kill()
        server.wait()


async def test_a_client_failing_mid_run_makes_the_others_leave_with_the_reason():
    cfg = make_cfg(workers=3, rounds=50)
    async with Harness(cfg) as h:
        def failing(k):
            if k == 2:
                raise RuntimeError("no batch 2 here")
            return batches_of(2)(k)

        workers = {j: h.worker(j) for j in (0, 1)}
        workers[2] = Worker(tiny_model(), loss_fn, failing, server=h.address, client_id=2, configure_threads=False)
        with pytest.raises(ClientsFailed) as err:
            await asyncio.to_thread(run_clients, workers)
        msg = str(err.value)
        assert msg.startswith("client 2 failed: no batch 2 here") and "(0-1)" in msg, msg
        assert isinstance(err.value.failed[2], RuntimeError)
        assert all(isinstance(err.value.failed[j], WorkerStopped) for j in (0, 1))
        sessions = h.coordinator.sessions
        for j in range(3):  # every client left, the stopped ones saying why
            assert sessions[j].left, j
        for j in (0, 1):
            assert "WorkerStopped: client 2 in the same process failed: no batch 2 here" in sessions[j].reason

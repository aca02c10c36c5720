"""Sharded servers with real processes over 127.0.0.1 (docs/design.md §6.3): `efmuon server --shard 0/2` and
`--shard 1/2` with 4 workers (a process each, or hosted by one or two processes) end in the W of one server (== `efmuon simulate`, tests/test_service_e2e.py), on
lsq and gpt-char; a shard killed with SIGKILL and resumed from its checkpoint ends identical as well; the
merged report has the whole model's w_sha256 and the summed bytes."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest

from conftest import CLI, finish, free_port, start, wait_round

LSQ = ["--task", "lsq", "--task-option", "bias=true", "--workers", "4", "--uplink", "randk:0.5",
       "--downlink", "rankk:2"]


def shard(i: int, port: int, tmp, flags, *extra: str) -> subprocess.Popen:
    return start(["server", "--host", "127.0.0.1", "--port", str(port), "--shard", f"{i}/2", *flags,
                  "--report", str(tmp / f"shard{i}.json"), "--plots", "none", *extra], tmp / f"shard{i}.log")


def workers(ports, tmp, groups=((0,), (1,), (2,), (3,))) -> list[subprocess.Popen]:
    """A worker process per group of client ids: `--client-id J` for a group of one, else `--clients A,B,..`
    (one process hosting those clients: each its own Worker and connections to every shard). Process i's log
    is worker{i}.log."""
    servers = ",".join(f"127.0.0.1:{p}" for p in ports)
    return [start(["worker", "--server", servers,
                   *(["--client-id", str(g[0])] if len(g) == 1 else ["--clients", ",".join(map(str, g))])],
                  tmp / f"worker{i}.log") for i, g in enumerate(groups)]


def worker_lines(tmp, n: int) -> dict[int, str]:
    """Client id -> the final stats line (`worker J: ...; w_sha256 H`) of every worker log under `tmp`."""
    out = {}
    for log in sorted(tmp.glob("worker*.log")):
        for line in log.read_text().splitlines():
            if line.startswith("worker ") and "w_sha256" in line:
                out[int(line.split()[1].rstrip(":"))] = line
    assert sorted(out) == list(range(n)), out
    return out


def simulate(tmp, flags) -> subprocess.Popen:
    """`efmuon simulate` with `flags`, started now (beside the networked run); `simulated` reads its report."""
    return subprocess.Popen(CLI + ["simulate", *flags, "--report", str(tmp / "sim.json"), "--plots", "none"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def simulated(proc: subprocess.Popen, tmp) -> dict:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads((tmp / "sim.json").read_text())


def merge(tmp) -> dict:
    out = subprocess.run(CLI + ["report", "merge", str(tmp / "shard1.json"), str(tmp / "shard0.json"),
                                "-o", str(tmp / "merged.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads((tmp / "merged.json").read_text())


GPT_CHAR = ["--task", "gpt-char", "--workers", "4", "--eval-every", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("flags, groups", [
    ([*LSQ, "--rounds", "5"], ((0,), (1,), (2,), (3,))),  # a process per worker
    ([*GPT_CHAR, "--rounds", "3"], ((0, 1, 2, 3),)),      # one process hosting the 4 workers
], ids=["lsq", "gpt-char"])
def test_two_shards_and_four_workers_end_in_one_servers_bits_and_the_reports_merge(tmp_path, flags, groups):
    sim = simulate(tmp_path, flags)
    ports = [free_port(), free_port()]
    servers = [shard(i, p, tmp_path, flags) for i, p in enumerate(ports)]
    try:
        wait_round(ports[0], 0, servers[0], tmp_path / "shard0.log")
        wait_round(ports[1], 0, servers[1], tmp_path / "shard1.log")
        # the shards' addresses in the wrong order: refused at once, naming the order
        wrong = subprocess.run(CLI + ["worker", "--server", f"127.0.0.1:{ports[1]},127.0.0.1:{ports[0]}",
                                      "--client-id", "0"], capture_output=True, text=True, timeout=60)

        # Execute
        codes = finish([*servers, *workers(ports, tmp_path, groups)], tmp_path)
    finally:
        for p in servers:
            if p.poll() is None:
                p.kill()

    # Assert
    ref = simulated(sim, tmp_path)
    assert wrong.returncode != 0 and "shard order" in wrong.stderr and "Traceback" not in wrong.stderr
    assert codes == [0] * (2 + len(groups))
    w = ref["summary"]["w_sha256"]
    assert all(line.endswith(f"w_sha256 {w}") for line in worker_lines(tmp_path, 4).values())
    s0 = json.loads((tmp_path / "shard0.json").read_text())["summary"]
    assert s0["shard"]["index"] == 0 and s0["w_sha256"] != w  # a shard's own hash is of its layers only
    merged = merge(tmp_path)
    s = merged["summary"]
    assert s["w_sha256"] == w and s["x_sha256"] == ref["summary"]["x_sha256"]
    assert s["final_loss_w"] == ref["summary"]["final_loss_w"] and s["eval_loss_w"] == ref["summary"]["eval_loss_w"]
    assert [x["index"] for x in s["shards"]] == [0, 1]
    assert s["parameters"] == ref["summary"]["parameters"]
    assert s["uncompressed_bytes"] == ref["summary"]["uncompressed_bytes"]
    for d in ("up", "down"):
        assert [r["bytes"][d]["payload"] for r in merged["rounds"]] == [r["bytes"][d]["payload"] for r in ref["rounds"]]
        assert s["bytes"][d]["payload"] == sum(x["bytes"][d]["payload"] for x in s["shards"])
        assert s["bytes"][d]["wire"] >= s["bytes"][d]["message"] >= s["bytes"][d]["payload"] > 0


@pytest.mark.slow
def test_a_shard_killed_and_resumed_ends_identical(tmp_path):
    flags = [*LSQ, "--rounds", "10"]
    sim = simulate(tmp_path, flags)
    ports = [free_port(), free_port()]
    ckpt = tmp_path / "ckpt1"
    servers = [shard(0, ports[0], tmp_path, flags),
               shard(1, ports[1], tmp_path, flags, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1")]
    wait_round(ports[1], 0, servers[1], tmp_path / "shard1.log")
    procs = workers(ports, tmp_path, ((0, 1), (2, 3)))  # two processes, two clients each
    resumed = None
    try:
        killed_at = wait_round(ports[1], 3, servers[1], tmp_path / "shard1.log")

        # Execute: SIGKILL shard 1 mid-run; restart it on its port from its checkpoint
        servers[1].send_signal(signal.SIGKILL)
        servers[1].wait(timeout=10)
        resumed = start(["server", "--host", "127.0.0.1", "--port", str(ports[1]), "--resume", str(ckpt)],
                        tmp_path / "shard1.log")
        codes = finish([servers[0], resumed, *procs], tmp_path)
    finally:
        for p in [*servers, *procs] + ([resumed] if resumed else []):
            if p.poll() is None:
                p.kill()

    # Assert
    ref = simulated(sim, tmp_path)["summary"]["w_sha256"]
    assert codes == [0] * 4
    assert 3 <= killed_at < 10
    assert "resumed from" in (tmp_path / "shard1.log").read_text()
    assert all(line.endswith(f"w_sha256 {ref}") for line in worker_lines(tmp_path, 4).values())
    for i in range(2):
        assert "reconnecting" in (tmp_path / f"worker{i}.log").read_text()
    assert merge(tmp_path)["summary"]["w_sha256"] == ref


@pytest.mark.slow
def test_efmuon_run_shards_on_gpt_char_matches_simulate(tmp_path):
    flags = ["--task", "gpt-char", "--workers", "4", "--rounds", "2"]
    sim = simulate(tmp_path, flags)

    # Execute
    out = subprocess.run(CLI + ["run", *flags, "--shards", "2", "--report", str(tmp_path / "run.json"),
                                "--plots", "none"], capture_output=True, text=True, timeout=300)

    # Assert
    ref = simulated(sim, tmp_path)["summary"]
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "run.json").read_text())
    s = report["summary"]
    assert s["w_sha256"] == ref["w_sha256"] and s["x_sha256"] == ref["x_sha256"]
    assert s["eval_loss_w"] == ref["eval_loss_w"] and s["final_loss_x"] == ref["final_loss_x"]
    assert len(s["shards"]) == 2 and sorted(sum((x["layers"] for x in s["shards"]), [])) == \
        list(range(len(sum((x["layers"] for x in s["shards"]), []))))
    assert (tmp_path / "run.shard0.json").is_file() and (tmp_path / "run.shard1.layers.safetensors").is_file()
    assert f"w_sha256 {ref['w_sha256']}" in out.stdout

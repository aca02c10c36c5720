"""How `efmuon run` starts its workers (server.spawn): forked from the zygote (cli.zygote) that loaded
torch once, or exec'd one by one ($EFMUON_WORKER_SPAWN=exec). Both give the same bits; the zygote
reports each worker's pid and exit code, and stops what still runs when the run closes it."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from efmuon.server.spawn import ForkServer

from conftest import CLI

RUN = ["run", "--task", "lsq", "--workers", "2", "--rounds", "3", "--plots", "none"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote needs Linux")
def test_forked_and_execd_workers_give_the_same_bits(tmp_path):
    # Execute
    codes, reports = [], []
    for mode in ("fork", "exec"):
        report = tmp_path / f"{mode}.json"
        out = subprocess.run(CLI + RUN + ["--report", str(report)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "EFMUON_WORKER_SPAWN": mode})
        codes.append((out.returncode, out.stderr[-2000:]))
        reports.append(json.loads(report.read_text())["summary"])

    # Assert
    assert [c for c, _ in codes] == [0, 0], codes
    assert reports[0]["w_sha256"] == reports[1]["w_sha256"]
    assert reports[0]["x_sha256"] == reports[1]["x_sha256"]
    assert reports[0]["rounds"] == reports[1]["rounds"] == 3


def test_an_unknown_spawn_mode_is_one_clear_error(tmp_path):
    out = subprocess.run(CLI + RUN + ["--report", str(tmp_path / "r.json")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "EFMUON_WORKER_SPAWN": "thread"})
    assert out.returncode == 2
    assert "EFMUON_WORKER_SPAWN='thread' is not a way to start workers: give fork or exec" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote needs Linux")
async def test_the_zygote_reports_exit_codes_and_stops_what_still_runs_when_closed():
    # Prepare
    forks = ForkServer({**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # Execute: a worker whose flags are refused (exit 2), and one that waits for a server that never
        # comes (it would try for 300 s)
        refused = await forks.fork(0, ["--server", "127.0.0.1:1", "--client-id", "-1"])
        waiting = await forks.fork(1, ["--server", "127.0.0.1:1", "--client-id", "1", "--connect-timeout", "300"])
        code = await asyncio.wait_for(refused.wait(), 60)
        assert waiting.returncode is None and alive(waiting.pid)
        await forks.aclose()
        stopped = await asyncio.wait_for(waiting.wait(), 60)
    finally:
        forks.close()

    # Assert: the refusal's code came through; the waiting one was stopped (SIGTERM) and reaped
    assert code == 2
    assert stopped != 0
    deadline = time.monotonic() + 30
    while alive(waiting.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(waiting.pid)
    assert forks.proc.returncode == 0

"""`efmuon run` (a real server and 4 worker processes over gRPC on 127.0.0.1) ends in the same W as
`efmuon simulate` with the same flags, bit for bit, and its report counts bytes at three levels."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import efmuon_cli

FLAGS = ["--task", "lsq", "--workers", "4", "--rounds", "20", "--uplink", "topk:0.1", "--downlink", "rankk:2"]


def efmuon(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efmuon.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run = efmuon("run", *FLAGS, "--report", str(tmp / "A.json"))
    assert run.returncode == 0, run.stderr
    sim = efmuon_cli("simulate", *FLAGS, "--report", str(tmp / "B.json"))
    assert sim.returncode == 0, sim.stderr
    return json.loads((tmp / "A.json").read_text()), json.loads((tmp / "B.json").read_text()), run.stdout


@pytest.mark.slow
def test_run_matches_simulate_bit_for_bit(reports):
    networked, simulated, _ = reports

    # Assert
    assert networked["summary"]["w_sha256"] == simulated["summary"]["w_sha256"]
    assert networked["summary"]["x_sha256"] == simulated["summary"]["x_sha256"]
    assert [r["loss_w"] for r in networked["rounds"]] == [r["loss_w"] for r in simulated["rounds"]]
    assert [r["loss_x"] for r in networked["rounds"]] == [r["loss_x"] for r in simulated["rounds"]]
    # payload bytes are the compressor frames: the same with and without a transport
    assert [r["bytes"]["up"]["payload"] for r in networked["rounds"]] == \
        [r["bytes"]["up"]["payload"] for r in simulated["rounds"]]
    assert [r["bytes"]["down"]["payload"] for r in networked["rounds"]] == \
        [r["bytes"]["down"]["payload"] for r in simulated["rounds"]]
    assert networked["summary"]["init_bytes"]["up"]["payload"] == simulated["summary"]["init_bytes"]["up"]["payload"]
    assert networked["summary"]["init_bytes"]["down"]["payload"] == \
        simulated["summary"]["init_bytes"]["down"]["payload"]


def test_report_shape_and_progress(reports):
    networked, _, stdout = reports

    # Assert
    assert networked["summary"]["rounds"] == 20 and len(networked["rounds"]) == 20
    assert [r["round"] for r in networked["rounds"]] == list(range(1, 21))
    assert "round    20/20" in stdout and "w_sha256" in stdout
    for r in networked["rounds"]:
        assert set(r["clients"]) == {"0", "1", "2", "3"}


def test_wire_at_least_message_at_least_payload_everywhere(reports):
    networked, _, _ = reports
    s = networked["summary"]
    entries = [("init", s["init_bytes"], s["init_clients"])] + \
              [(r["round"], r["bytes"], r["clients"]) for r in networked["rounds"]]

    # Assert: every direction and round, totals and per client
    for where, totals, clients in entries:
        for figures in [totals, *clients.values()]:
            for d in ("up", "down"):
                b = figures[d]
                assert b["wire"] >= b["message"] >= b["payload"] > 0, (where, d, b)
        for d in ("up", "down"):
            for lvl in ("payload", "message", "wire"):
                assert totals[d][lvl] == sum(c[d][lvl] for c in clients.values())
    # the same downlink bytes went to every client
    for r in networked["rounds"]:
        assert len({c["down"]["payload"] for c in r["clients"].values()}) == 1

"""The GPU path (--device cuda): exercised where a CUDA device is present, skipped cleanly elsewhere; and
benchmarks/gpu_check.sh, which skips in one line without a device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from efmuon.cli import main
from efmuon.common.errors import ConfigError
from efmuon.common.runtime import resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.cuda
@needs_cuda
def test_simulate_on_cuda_converges(tmp_path):
    path = tmp_path / "r.json"
    assert main(["simulate", "--task", "lsq", "--workers", "2", "--rounds", "100", "--device", "cuda",
                 "--uplink", "topk:0.1", "--downlink", "rankk:2", "--report", str(path), "--plots", "none"]) == 0
    r = json.loads(path.read_text())
    s = r["summary"]
    assert (s["initial_loss"] - s["f_star"]) / (s["final_loss_w"] - s["f_star"]) > 100


@pytest.mark.cuda
@needs_cuda
def test_run_on_cuda_server_and_workers(tmp_path):
    path = tmp_path / "r.json"
    assert main(["run", "--task", "lsq", "--workers", "2", "--rounds", "10", "--device", "cuda",
                 "--uplink", "topk:0.1", "--downlink", "topk:0.1", "--report", str(path), "--plots", "none"]) == 0
    r = json.loads(path.read_text())
    assert r["summary"]["rounds"] == 10 and r["rounds"][-1]["loss_w"] < r["rounds"][0]["loss_w"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the whole GPU check where a device is present")
def test_gpu_check_script_skips_in_one_line_without_a_gpu(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    out = tmp_path / "gc.json"
    p = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False)"]
    assert json.loads(out.read_text()) == {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}

"""The GPU path (--device cuda): exercised where a CUDA device is present, skipped cleanly elsewhere."""
from __future__ import annotations

import json

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

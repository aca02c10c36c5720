"""The `gpt` task: byte-level GPT in three sizes (small, 10m, 124m = GPT-2 small's shape), its model,
data and batches; one round over gRPC; the 124m round on CPU (marker `big`, deselected by default:
`python -m pytest -m big -n 0 tests/test_gpt.py`), and on CUDA where a device is present."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from efmuon.cli import main
from efmuon.common.errors import ConfigError
from efmuon.common.model import gradients, parameters_of
from efmuon.common.tasks import make_task
from efmuon.common.tasks.gpt import SIZES, gpt_parameters

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_presets_parameter_counts_and_tied_embedding():
    assert gpt_parameters(12, 768, 1024) == 85_917_696  # GPT-2 small's shape, 256 byte tokens, tied
    assert gpt_parameters(12, 768, 1024, vocab=50257) == 124_318_464  # GPT-2's vocabulary: 124M
    assert 10e6 <= gpt_parameters(6, 384, 256) <= 30e6  # the CPU-sized preset
    assert SIZES["124m"] == {**SIZES["124m"], "n_layers": 12, "d_model": 768, "n_heads": 12, "context": 1024}
    state = torch.random.get_rng_state()
    task = make_task("gpt", 2, size="124m")
    model = task.build_model()  # seconds, not minutes: plain CPU init under a forked RNG, no meta device
    assert torch.equal(torch.random.get_rng_state(), state)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and model.lm_head.weight is model.wte.weight
    assert sum(p.numel() for p in model.parameters()) == task.n_parameters == 85_917_696
    assert task.describe()["parameters"] == 85_917_696 and task.options["context"] == 1024


def test_small_model_is_deterministic_and_learns_bytes():
    a, b = make_task("gpt", 2, size="small"), make_task("gpt", 2, size="small", tie=False)
    assert a.corpus_sha256 == b.corpus_sha256 and a.vocab_size == 256
    x, y = a.batch(1, 3)
    assert x.dtype == torch.int64 and x.shape == (8, 128) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(a.batch(1, 3)[0], x) and not torch.equal(a.batch(0, 3)[0], x)
    m1, m2 = a.build_model(), a.build_model()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert "lm_head.weight" in dict(b.build_model().named_parameters())
    assert a.decode(a.encode("héllo")) == "héllo"
    # a few plain gradient steps on one batch lower its loss (the model and loss are wired right)
    names, params = parameters_of(m1)
    first = None
    for _ in range(3):
        loss, grads = gradients(m1, params, lambda m: a.loss(m, (x, y)))
        first = loss if first is None else first
        params = [p - 0.05 * g for p, g in zip(params, grads)]
    assert loss < first - 0.5  # 5.27 -> 3.96 here
    assert 4.0 < a.eval_loss(m2) < 6.5  # ~ln 256 = 5.55 at the initialisation


@pytest.mark.parametrize("opts, match", [({"size": "huge"}, "size='huge' must be one of"),
                                         ({"size": "small", "n_heads": 3}, "must be divisible"),
                                         ({"vocab": 100}, "vocab=100 must be an integer >= 256"),
                                         ({"size": "small", "context": 10**7}, "shorter than context")])
def test_bad_options_are_clear_errors(opts, match):
    with pytest.raises(ConfigError, match=match):
        make_task("gpt", 2, **opts)


def test_print_config_states_the_parameter_count(capsys):
    assert main(["run", "--task", "gpt", "--task-option", "size=124m", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "model: gpt size=124m: 12 layers, d_model 768, 12 heads, context 1024" in out
    assert "85,917,696 parameters (85.9M)" in out and "tied embedding" in out


def test_gpt_char_is_unchanged():
    t = make_task("gpt-char", 4)
    names = [n for n, _ in t.build_model().named_parameters()]
    assert names[-1] == "lm_head.weight" and len(names) == 2 + 4 * 2 + 1
    assert t.defaults["lr"] == 0.075 and t.defaults["beta"] == 0.3 and t.options["d_model"] == 64


@pytest.mark.slow
def test_small_round_over_grpc_records_both_peak_rss(tmp_path):
    path = tmp_path / "r.json"
    assert main(["run", "--task", "gpt", "--task-option", "size=small", "--workers", "2", "--rounds", "2",
                 "--report", str(path), "--plots", "none"]) == 0
    s = json.loads(path.read_text())["summary"]
    assert s["rounds"] == 2 and s["server_peak_rss_bytes"] > 0 and s["worker_peak_rss_bytes"] > 0


def _run_124m(tmp_path, *extra: str) -> dict:
    path = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "efmuon.cli", "run", "--task", "gpt", "--task-option", "size=124m",
           "--task-option", "batch_size=1", "--workers", "1", "--rounds", "1", "--report", str(path),
           "--plots", "none", *extra]
    subprocess.run(cmd, check=True, timeout=1200, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads(path.read_text())["summary"]


@pytest.mark.big
def test_124m_round_over_grpc_on_cpu(tmp_path):
    """BENCHMARKS.md "GPT-2 small shape": the 124m preset, one round (plus the init round) over gRPC."""
    s = _run_124m(tmp_path)
    assert s["rounds"] == 1 and 4.0 < s["initial_loss"] < 6.5  # ~ln 256 at the initialisation
    assert math.isfinite(s["final_loss_x"]) and s["final_loss_x"] < 20  # one step at the task's lr, batch 1
    model = 4 * 85_917_696
    assert 2 * model < s["server_peak_rss_bytes"] < 16 * model and model < s["worker_peak_rss_bytes"] < 12 * model


@pytest.mark.cuda
@needs_cuda
def test_small_trains_on_cuda(tmp_path):
    path = tmp_path / "r.json"
    assert main(["simulate", "--task", "gpt", "--task-option", "size=small", "--workers", "2", "--rounds", "30",
                 "--device", "cuda", "--report", str(path), "--plots", "none"]) == 0
    s = json.loads(path.read_text())["summary"]
    assert s["final_loss_x"] < s["initial_loss"]


@pytest.mark.big
@pytest.mark.cuda
@needs_cuda
def test_124m_round_over_grpc_on_cuda(tmp_path):
    s = _run_124m(tmp_path, "--device", "cuda")
    assert s["rounds"] == 1 and 4.0 < s["initial_loss"] < 6.5 and math.isfinite(s["final_loss_x"])

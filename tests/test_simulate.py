"""`efmuon simulate` end to end (in process): convergence bars of the core issue and the report shape."""
from __future__ import annotations

import json

import pytest
from efmuon.cli import main
from efmuon.common.config import RunConfig
from efmuon.simulate.sync import simulate


def _sim(tmp_path, *flags):
    path = tmp_path / "r.json"
    assert main(["simulate", *flags, "--report", str(path), "--log-every", "1000"]) == 0
    return json.loads(path.read_text())


def _reduction(report):
    s = report["summary"]
    return (s["initial_loss"] - s["f_star"]) / (s["final_loss_w"] - s["f_star"])


@pytest.fixture(scope="module")
def lsq_identity(tmp_path_factory):
    return _sim(tmp_path_factory.mktemp("lsq"), "--task", "lsq", "--workers", "4", "--rounds", "300",
                "--uplink", "identity", "--downlink", "identity")


def test_report_shape(lsq_identity):
    r = lsq_identity
    assert set(r) == {"config", "rounds", "summary"}
    assert len(r["rounds"]) == 300
    e = r["rounds"][0]
    for key in ("round", "loss_w", "loss_x", "seconds", "bytes"):
        assert key in e
    assert e["bytes"]["up"]["message"] is None and e["bytes"]["up"]["wire"] is None  # no transport
    s = r["summary"]
    for key in ("rounds", "final_loss_w", "final_loss_x", "eval_loss_w", "bytes", "uncompressed_bytes", "w_sha256", "f_star"):
        assert key in s, key
    assert len(s["w_sha256"]) == 64
    # identity fp32 both ways sends (about) the uncompressed figure: frames add only small headers
    assert s["uncompressed_bytes"]["up"] <= s["bytes"]["up"]["payload"] <= 1.05 * s["uncompressed_bytes"]["up"]


def test_lsq_identity_cuts_suboptimality_1e4(lsq_identity):
    assert _reduction(lsq_identity) >= 1e4


@pytest.mark.parametrize("down", ["identity", "topk:0.1"])
def test_lsq_topk_cuts_suboptimality_1e3_with_a_quarter_of_the_bytes(tmp_path, lsq_identity, down):
    r = _sim(tmp_path, "--task", "lsq", "--workers", "4", "--rounds", "300", "--uplink", "topk:0.1", "--downlink", down)
    assert _reduction(r) >= 1e3
    assert r["summary"]["bytes"]["up"]["payload"] <= 0.25 * lsq_identity["summary"]["bytes"]["up"]["payload"]


@pytest.mark.parametrize("task", ["lsq", "digits"])
@pytest.mark.parametrize("down", ["rankk:4", "topk:0.1"])
def test_bidirectional_converges_and_reports_w_and_x(tmp_path, task, down):
    rounds = "300" if task == "lsq" else "150"
    r = _sim(tmp_path, "--task", task, "--workers", "4", "--rounds", rounds, "--uplink", "topk:0.1", "--downlink", down)
    first, last = r["rounds"][0], r["rounds"][-1]
    assert last["loss_w"] is not None and last["loss_x"] is not None
    assert last["loss_w"] < 0.5 * first["loss_w"]
    assert last["loss_x"] < 0.5 * first["loss_x"]
    if task == "lsq":
        assert _reduction(r) >= 1e2
    else:
        assert r["summary"]["eval_loss_w"] < 0.5


@pytest.mark.parametrize("task", ["lsq", "digits"])
def test_ef14_runs(tmp_path, task):
    r = _sim(tmp_path, "--task", task, "--workers", "4", "--rounds", "100", "--method", "ef14",
             "--uplink", "topk:0.1", "--downlink", "topk:0.1")
    assert r["rounds"][-1]["loss_w"] < r["rounds"][0]["loss_w"]


def test_same_seed_same_bits_and_seed_matters():
    cfg = RunConfig(task="lsq", workers=2, rounds=15, uplink="randk:0.2", downlink="rankk:2")
    a = simulate(cfg, quiet=True)["summary"]["w_sha256"]
    b = simulate(cfg, quiet=True)["summary"]["w_sha256"]
    c = simulate(cfg.replace(seed=1), quiet=True)["summary"]["w_sha256"]
    assert a == b != c


def test_bad_flag_values_are_clear_errors(capsys):
    assert main(["simulate", "--task", "lsq", "--uplink", "topk:2.5"]) == 2
    err = capsys.readouterr().err
    assert "topk" in err
    assert main(["simulate", "--task", "lsq", "--beta", "1.5"]) == 2
    assert "beta" in capsys.readouterr().err


@pytest.mark.slow
def test_lmo_threads_flag_is_checked_and_honoured(capsys):
    assert main(["simulate", "--task", "lsq", "--lmo-threads", "-1"]) == 2
    assert "lmo_threads" in capsys.readouterr().err
    # lsq's 512x1024-class matrix is above lmo.LMO_PARALLEL_MIN_FLOPS: automatic = every core
    cfg = RunConfig(task="lsq", workers=4, rounds=3, uplink="topk:0.1", downlink="quant:4",
                    task_options={"d_in": 1024, "d_out": 512})
    auto = simulate(cfg, quiet=True)["summary"]
    one = simulate(cfg.replace(lmo_threads=1), quiet=True)["summary"]
    # the same run on another thread count: the same losses up to float32 summation order (the bits may
    # differ on CPUs whose sgemm splits sums by thread); the same count twice gives the same bits
    assert one["final_loss_w"] == pytest.approx(auto["final_loss_w"], rel=1e-4)
    assert simulate(cfg.replace(lmo_threads=1), quiet=True)["summary"]["w_sha256"] == one["w_sha256"]

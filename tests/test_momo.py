"""MuonMax-Momo (`--preset muonmax-momo`): the truncated step against an independent float64 numpy
implementation of the notes' formula (docs/design.md §3; ef21-muon-notes §5, GPT-opt's MuonMaxMomo) on
a two-layer problem, truncated and untruncated; its state through a checkpoint; and `efmuon run` ==
`efmuon simulate` bit for bit with it."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import efmuon_cli
import torch
from efmuon.common.algorithm import ServerState, WorkerState, params_sha256
from efmuon.common.checkpoint import load_server, restore_server, save_server
from efmuon.common.config import RunConfig, resolve
from efmuon.common.errors import ConfigError
from efmuon.common.lmo import assign_norms, lmo_all

RNG = np.random.default_rng(7)
A = RNG.standard_normal((6, 5))   # inputs (rows: samples)
B = RNG.standard_normal((6, 3))   # targets
SHAPES = {"l1.weight": (4, 5), "l2.weight": (3, 4)}  # f(W1, W2) = 0.5/6 ||A W1^T W2^T - B||_F^2


def loss_and_grads(W1: np.ndarray, W2: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """The two-layer least-squares loss and its gradients, by hand (float64)."""
    H = A @ W1.T
    R = H @ W2.T - B
    n = A.shape[0]
    gW2 = R.T @ H / n
    gW1 = (R @ W2).T @ A / n
    return 0.5 * float((R * R).sum()) / n, [gW1, gW2]


def _setup(lr: float, f_star: float, beta: float = 0.3):
    cfg = resolve(RunConfig(task="lsq", workers=1, rounds=6, lr=lr, beta=beta, schedule="constant", warmup=0,
                            preset="muonmax-momo", f_star=f_star, uplink="identity", downlink="identity"), {})
    specs = assign_norms(list(SHAPES.items()), preset="muonmax-momo")
    gen = torch.Generator().manual_seed(3)
    params = [0.5 * torch.randn(s, generator=gen) for s in SHAPES.values()]
    return cfg, specs, params


def _momo_reference_and_server(lr: float, f_star: float, steps: int = 5, beta: float = 0.3):
    """Run the server (one client, identity both ways: W == X, G == the momentum) next to an independent
    float64 numpy Momo: m = (1-b) m + b g; loss_model = (1-b) loss_model + b (f - <x, g>);
    t = min(lr, (loss_model - F* + <x, m>)_+ / dual^2), dual = the MuonMax scale (the stale nuclear sum).
    Returns [(server t, reference t, lr)] per step; asserts X moved by the reference t."""
    cfg, specs, params = _setup(lr, f_star, beta)
    server = ServerState(params, specs, cfg, 1)
    worker = WorkerState(params, specs, cfg, 0)
    x = [p.double().numpy() for p in params]
    f, g = loss_and_grads(*x)
    server.aggregate({0: worker.init_uplink([torch.tensor(t, dtype=torch.float32) for t in g])}, init=True)
    server.observe_losses({0: f}, init=True)
    m = [t.copy() for t in g]                                   # 'grad' init: m_0 = g_0
    model = f - sum(float((xi * gi).sum()) for xi, gi in zip(x, g))
    out = []
    for _ in range(steps):
        X_old = [t.clone() for t in server.X]
        dirs = lmo_all([t.clone() for t in server.G], specs)   # the step's LMO (not what is tested here)
        stale = server.stale_nuclear
        frames = server.step()
        scale = stale if stale is not None else server.stale_nuclear  # first step: fresh nuclear sum
        gap = model - f_star + sum(float((xi * mi).sum()) for xi, mi in zip(x, m))
        t_ref = min(lr, max(gap, 0.0) / scale ** 2)
        out.append((server.momo["t"], t_ref, lr))
        for i in range(2):
            expect = X_old[i].double() + t_ref * scale * dirs[i].double()
            assert torch.allclose(server.X[i].double(), expect, rtol=1e-5, atol=1e-6)
            x[i] = x[i] + t_ref * scale * dirs[i].double().numpy()
        worker.apply_downlink(frames)
        f, g = loss_and_grads(*x)
        server.aggregate({0: worker.make_uplink([torch.tensor(t, dtype=torch.float32) for t in g])})
        server.observe_losses({0: f})
        model = (1 - beta) * model + beta * (f - sum(float((xi * gi).sum()) for xi, gi in zip(x, g)))
        m = [(1 - beta) * mi + beta * gi for mi, gi in zip(m, g)]
    return out, server


def test_untruncated_steps_take_the_scheduled_lr():
    steps, _ = _momo_reference_and_server(lr=1e-3, f_star=0.0)
    for t, t_ref, lr in steps:
        assert t_ref == lr and t == lr


def test_truncated_steps_match_the_reference_formula():
    steps, _ = _momo_reference_and_server(lr=10.0, f_star=0.0)
    for t, t_ref, lr in steps:
        assert t_ref < lr  # the model truncation binds at this lr
        assert t == pytest.approx(t_ref, rel=1e-5, abs=1e-9)


def test_f_star_shifts_the_truncation_and_the_positive_part_stops_the_step():
    low, _ = _momo_reference_and_server(lr=10.0, f_star=-1.0, steps=3)
    high, server = _momo_reference_and_server(lr=10.0, f_star=100.0, steps=3)  # F* above the loss model
    assert low[0][0] > _momo_reference_and_server(lr=10.0, f_star=0.0, steps=1)[0][0][0]
    for t, t_ref, _ in high:
        assert t == 0.0 and t_ref == 0.0  # (.)_+: never a step uphill


def test_momo_state_survives_a_checkpoint(tmp_path):
    _, server = _momo_reference_and_server(lr=10.0, f_star=0.0, steps=3)
    path = save_server(tmp_path, server)
    cfg, specs, params = _setup(10.0, 0.0)
    fresh = ServerState(params, specs, cfg, 1)
    restore_server(fresh, load_server(path))
    assert fresh.momo == server.momo and fresh.stale_nuclear == server.stale_nuclear
    a, b = server.step(), fresh.step()
    assert a == b and params_sha256(server.X, ["1", "2"]) == params_sha256(fresh.X, ["1", "2"])
    assert fresh.momo == server.momo
    # a checkpoint without Momo state cannot resume a muonmax-momo run
    cfg2 = cfg.replace(preset="muonmax")
    plain = ServerState(params, specs, cfg2, 1)
    path2 = save_server(tmp_path / "plain", plain)
    with pytest.raises(ConfigError, match="Momo state"):
        restore_server(fresh, load_server(path2), check_cfg=False)


def test_f_star_must_be_finite():
    with pytest.raises(ConfigError, match="f_star"):
        resolve(RunConfig(task="lsq", preset="muonmax-momo", f_star=float("nan")), {})


FLAGS = ["--task", "lsq", "--workers", "3", "--rounds", "8", "--preset", "muonmax-momo", "--lr", "0.05",
         "--f-star", "0.5", "--plots", "none"]


def _efmuon(*args: str) -> subprocess.CompletedProcess:
    return efmuon_cli(*args, timeout=120)


@pytest.mark.slow
def test_run_matches_simulate_bit_for_bit_with_momo(tmp_path):
    run = _efmuon("run", *FLAGS, "--report", str(tmp_path / "A.json"))
    assert run.returncode == 0, run.stderr
    sim = _efmuon("simulate", *FLAGS, "--report", str(tmp_path / "B.json"))
    assert sim.returncode == 0, sim.stderr
    plain = _efmuon("simulate", *[f if f != "muonmax-momo" else "muonmax" for f in FLAGS],
                    "--report", str(tmp_path / "C.json"))
    assert plain.returncode == 0, plain.stderr
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ABC")
    assert a["summary"]["w_sha256"] == b["summary"]["w_sha256"]
    assert a["summary"]["x_sha256"] == b["summary"]["x_sha256"]
    assert [r["loss_w"] for r in a["rounds"]] == [r["loss_w"] for r in b["rounds"]]
    # the truncation changed the run (so the equality covers the Momo path, not plain MuonMax)
    assert c["summary"]["w_sha256"] != b["summary"]["w_sha256"]

"""MLA + MoE (issue 13): stacked per-expert parameters through the LMOs, the dual norms, rankk and the
server's blocking; the adamw preset against torch.optim.AdamW; the gpt-moe task end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import efmuon_cli
from efmuon.common.algorithm import ServerState, WorkerState, layer_compressors
from efmuon.common.checkpoint import load_server, restore_server, save_server
from efmuon.common.compress import parse_spec
from efmuon.common.config import RunConfig, resolve
from efmuon.common.errors import ConfigError
from efmuon.common.lmo import (
    LayerSpec,
    assign_norms,
    block_dims,
    dual_norm,
    lmo_all,
    lmo_direction,
    newton_schulz,
    spectral_scale,
)
from efmuon.common.tasks import make_task


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- norms of stacked parameters


def test_assign_norms_views_expert_stacks_per_expert():
    specs = assign_norms([("moe.experts_in", (4, 24, 8)), ("moe.router.weight", (4, 8)),
                          ("conv.weight", (6, 3, 3, 3)), ("w3", (5, 6, 7)), ("attn.kv_down.weight", (3, 8))],
                         stacked_names={"w3"})
    by = {s.name: s for s in specs}
    assert by["moe.experts_in"].stacked and by["moe.experts_in"].norm == "spectral"
    assert by["moe.experts_in"].scale == pytest.approx(spectral_scale((24, 8), "muon")) == pytest.approx(math.sqrt(3))
    assert block_dims(by["moe.experts_in"]) == (4, 24, 8)
    assert by["w3"].stacked and block_dims(by["w3"]) == (5, 6, 7)
    assert not by["conv.weight"].stacked and block_dims(by["conv.weight"]) == (1, 6, 27)  # a conv stays one matrix
    assert by["moe.router.weight"].norm == "spectral" and not by["moe.router.weight"].stacked
    assert by["attn.kv_down.weight"].norm == "spectral"
    # sign per expert: 1/d_in of one expert's matrix
    s = assign_norms([("moe.experts_in", (4, 24, 8))], overrides={"*experts*": "sign"})[0]
    assert s.stacked and s.scale == pytest.approx(1 / 8)
    with pytest.raises(ConfigError, match="stacked"):
        LayerSpec("x", (4, 5), "spectral", 1.0, stacked=True)


def test_expert_lmo_is_one_newton_schulz_per_expert_with_its_muon_scale():
    G = torch.randn(5, 48, 16, generator=_gen(1))
    spec = assign_norms([("moe.experts_in", tuple(G.shape))])[0]
    ref = torch.stack([-spectral_scale((48, 16), "muon") * newton_schulz(G[e], 5, "jordan") for e in range(5)])
    d = lmo_direction(G, spec)
    torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-5)
    # lmo_all (with ordinary layers beside it) gives the same, contiguous and of G's shape
    other = torch.randn(16, 48, generator=_gen(2))
    specs = [assign_norms([("a.weight", (16, 48))])[0], spec]
    outs = lmo_all([other, G], specs)
    torch.testing.assert_close(outs[1], ref, rtol=1e-4, atol=1e-5)
    assert outs[1].is_contiguous() and outs[1].shape == G.shape
    torch.testing.assert_close(outs[0], lmo_direction(other, specs[0]), rtol=1e-4, atol=1e-5)
    # each expert is normalised on its own: scaling one expert's gradient changes no direction
    G2 = G.clone()
    G2[2] *= 1000.0
    torch.testing.assert_close(lmo_direction(G2, spec), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("norm", ["spectral", "sign", "colnorm", "rownorm"])
def test_dual_norm_of_a_stack_is_the_sum_over_experts(norm):
    G = torch.randn(3, 20, 12, generator=_gen(3))
    spec = assign_norms([("experts_out", tuple(G.shape))], overrides={"experts_out": norm})[0]
    one = assign_norms([("w", (20, 12))], overrides={"w": norm})[0]
    per = sum(dual_norm(G[e], one) for e in range(3))
    assert dual_norm(G, spec) == pytest.approx(per, rel=1e-5)
    assert dual_norm(G, spec, direction=lmo_direction(G, spec)) == pytest.approx(per, rel=1e-4)
    if norm == "spectral":  # the NS estimate lies in the documented band of the exact nuclear norm
        exact = float(torch.linalg.svdvals(G.double()).sum())
        assert 0.68 * exact <= per <= 1.14 * exact


def test_rankk_of_a_stack_is_rank_r_per_expert():
    E, m, n, r = 3, 24, 16, 2
    U, V = torch.randn(E, m, r, generator=_gen(4)), torch.randn(E, n, r, generator=_gen(5))
    x = U @ V.mT  # every expert of rank r
    spec = assign_norms([("moe.experts_in", (E, m, n))])[0]
    c = layer_compressors([spec], "rankk:2", {})[0]
    frame = c.encode(x, seed=9)
    assert len(frame) == c.frame_size(x.shape) == 22 + 4 * E * (m + n) * r
    torch.testing.assert_close(c.decode(frame, x.shape), x, rtol=1e-4, atol=1e-4)
    # the plain compressor views the stack as one (E, m*n) matrix: rank 2 of it loses an expert
    plain = parse_spec("rankk:2")
    assert plain.frame_size(x.shape) != c.frame_size(x.shape)
    assert float((plain.decode(plain.encode(x, 9), x.shape) - x).norm()) > 1e-2 * float(x.norm())


def test_server_blocks_keep_a_stack_whole_and_step_it():
    shapes = [("blocks.0.moe.experts_in", (4, 64, 32)), ("blocks.0.attn.q_proj.weight", (32, 32)),
              ("blocks.0.moe.experts_out", (4, 32, 64))]
    specs = assign_norms(shapes)
    cfg = resolve(RunConfig(task="lsq", workers=1, rounds=2, uplink="identity", downlink="identity"), {})
    st = ServerState([torch.zeros(s) for _, s in shapes], specs, cfg, 1)
    st.LMO_BLOCK_MIN_BYTES, st.LMO_BLOCK_FRACTION = 1, 1e-9  # force one block per unit
    assert sorted(map(tuple, st.lmo_blocks())) == [(0,), (1,), (2,)]
    st.G = [torch.randn(s, generator=_gen(i)) for i, (_, s) in enumerate(shapes)]
    st.step()
    ref = lmo_all(st.G, specs)
    for x, d in zip(st.X, ref):
        torch.testing.assert_close(x, d * cfg.lr, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- the adamw preset


def _lsq(seed=0):
    g = _gen(seed)
    A, b = torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g)
    return A, b, torch.randn(5, 3, generator=g) * 0.1, torch.randn(3, generator=g) * 0.1


def _grads(A, b, w, c):
    w, c = w.detach().requires_grad_(), c.detach().requires_grad_()
    ((A @ w + c - b) ** 2).mean().backward()
    return [w.grad, c.grad]


def test_adamw_preset_matches_torch_adamw():
    A, b, w0, c0 = _lsq()
    cfg = resolve(RunConfig(task="lsq", workers=1, rounds=6, preset="adamw", lr=0.05, beta=1.0,
                            schedule="constant", weight_decay=0.1, uplink="identity", downlink="identity",
                            adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6), {})
    specs = assign_norms([("w", (5, 3)), ("c", (3,))], preset="adamw")
    st = ServerState([w0, c0], specs, cfg, 1)
    wk = WorkerState([w0, c0], specs, cfg, 0)
    st.aggregate({0: wk.init_uplink(_grads(A, b, *wk.W))}, init=True)
    p = [w0.clone().requires_grad_(), c0.clone().requires_grad_()]
    opt = torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for _ in range(6):
        wk.apply_downlink(st.step())
        st.aggregate({0: wk.make_uplink(_grads(A, b, *wk.W))})
        opt.zero_grad()
        for q, g in zip(p, _grads(A, b, *p)):
            q.grad = g
        opt.step()
        for x, w, q in zip(st.X, st.W, p):
            torch.testing.assert_close(w, x, rtol=0, atol=1e-7)  # identity downlink: W == X (to rounding)
            torch.testing.assert_close(x, q.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(st.X[0], w0)


def test_adamw_moments_survive_a_checkpoint(tmp_path):
    A, b, w0, c0 = _lsq(1)
    cfg = resolve(RunConfig(task="lsq", workers=1, rounds=8, preset="adamw", uplink="quant:4",
                            downlink="sign:16"), {})
    assert cfg.lr == 1e-3 and cfg.beta == 1.0  # adamw's own defaults, not the Muon ones
    specs = assign_norms([("w", (5, 3)), ("c", (3,))], preset="adamw")

    def start():
        st, wk = ServerState([w0, c0], specs, cfg, 1), WorkerState([w0, c0], specs, cfg, 0)
        st.aggregate({0: wk.init_uplink(_grads(A, b, *wk.W))}, init=True)
        return st, wk

    def rounds(st, wk, n):
        for _ in range(n):
            wk.apply_downlink(st.step())
            st.aggregate({0: wk.make_uplink(_grads(A, b, *wk.W))})

    ref, wref = start()
    rounds(ref, wref, 6)
    st, wk = start()
    rounds(st, wk, 3)
    path = save_server(tmp_path, st)
    fresh = ServerState([w0, c0], specs, cfg, 1)
    restore_server(fresh, load_server(path))
    assert all(torch.equal(a, b) for a, b in zip(fresh.adam[1], st.adam[1])) and fresh.round == 3
    rounds(fresh, wk, 3)
    assert all(torch.equal(a, b) for a, b in zip(fresh.X, ref.X))
    assert all(torch.equal(a, b) for a, b in zip(fresh.adam[0], ref.adam[0]))
    # a checkpoint without moments cannot resume an adamw run
    plain = resolve(RunConfig(task="lsq", workers=1, rounds=8, uplink="quant:4", downlink="sign:16"), {})
    path2 = save_server(tmp_path / "muon", ServerState([w0, c0], specs, plain, 1))
    with pytest.raises(ConfigError, match="Adam"):
        restore_server(ServerState([w0, c0], specs, cfg, 1), load_server(path2), check_cfg=False)


def test_adam_config_is_checked():
    with pytest.raises(ConfigError, match="adam_beta2"):
        resolve(RunConfig(task="lsq", preset="adamw", adam_beta2=1.0), {})
    with pytest.raises(ConfigError, match="adam_eps"):
        resolve(RunConfig(task="lsq", preset="adamw", adam_eps=0), {})


# --------------------------------------------------------------------------- the gpt-moe task


def test_gpt_moe_model_layout_and_loss():
    t = make_task("gpt-moe", 2, seed=0, n_layers=1)
    m = t.build_model()
    shapes = dict((n, tuple(p.shape)) for n, p in m.named_parameters())
    assert shapes["blocks.0.moe.experts_in"] == (4, 128, 64) and shapes["blocks.0.moe.experts_out"] == (4, 64, 128)
    assert shapes["blocks.0.attn.kv_down.weight"] == (32, 64) and shapes["blocks.0.attn.k_up.weight"] == (64, 32)
    assert shapes["blocks.0.attn.q_down.weight"] == (32, 64)
    assert t.stacked_names == {"blocks.0.moe.experts_in", "blocks.0.moe.experts_out"}
    x, y = t.batch(0, 0)
    logits, aux = m(x)
    assert logits.shape == (*x.shape, t.vocab_size) and 0 < float(aux.detach()) < 4  # E sum_e f_e P_e
    loss = t.loss(m, (x, y))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert float(m.blocks[0].moe.router.weight.grad.abs().sum()) > 0  # the router learns (gates + aux)
    assert float(loss.detach()) > t.eval_loss(m) - 0.5  # CE + small aux, close to the evaluation CE
    assert "q_proj" in "".join(n for n, _ in make_task("gpt-moe", 2, q_latent=0, n_layers=1).build_model().named_parameters())
    with pytest.raises(ConfigError, match="top_k"):
        make_task("gpt-moe", 2, experts=2, top_k=3)


def _cli(*args, timeout=240):
    return efmuon_cli(*args, timeout=timeout)


SMALL = ["--task", "gpt-moe", "--workers", "2", "--task-option", "n_layers=1", "--task-option", "batch_size=8",
         "--task-option", "context=32", "--plots", "none"]


@pytest.mark.slow
def test_gpt_moe_trains_with_the_default_compression(tmp_path):
    p = _cli("simulate", *SMALL, "--rounds", "25", "--report", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    losses = [r["loss_w"] for r in rep["rounds"] if r.get("loss_w") is not None]
    assert losses[-1] < losses[0] - 0.8, losses


@pytest.mark.slow
@pytest.mark.parametrize("preset,extra", [("muon", []), ("adamw", []), ("muon", ["--uplink", "rankk:4"])])
def test_gpt_moe_run_equals_simulate_bit_for_bit(tmp_path, preset, extra):
    """The default compression (and rankk, rank 4 per expert on the stacks) over the network."""
    flags = [*SMALL, "--rounds", "3", "--preset", preset, *extra]
    a = _cli("run", *flags, "--report", str(tmp_path / "net.json"))
    assert a.returncode == 0, a.stdout + a.stderr
    b = _cli("simulate", *flags, "--report", str(tmp_path / "sim.json"))
    assert b.returncode == 0, b.stdout + b.stderr
    net, sim = (json.loads((tmp_path / f).read_text()) for f in ("net.json", "sim.json"))
    assert net["summary"]["w_sha256"] == sim["summary"]["w_sha256"]

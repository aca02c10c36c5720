"""The EF21-Muon round (common/algorithm.py) against independent references and its invariants."""
from __future__ import annotations

import math

import pytest
import torch
from efmuon.common.algorithm import (
    ServerState,
    WorkerState,
    all_finite,
    frame_seed,
    lr_at,
)
from efmuon.common.config import RunConfig, resolve
from efmuon.common.errors import FrameError, ProtocolError
from efmuon.common.lmo import assign_norms

SHAPES = [("embed.weight", (20, 8)), ("h.0.weight", (16, 8)), ("h.1.weight", (8, 16)), ("h.1.bias", (8,)),
          ("lm_head.weight", (20, 8))]


def _problem(seed=0, n=3):
    """A separable quadratic per worker: f_j(W) = 0.5 * sum_i ||W_i - T_ij||^2 (gradient W_i - T_ij)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for _, s in SHAPES]
    targets = [[torch.randn(s, generator=gen) for _, s in SHAPES] for _ in range(n)]
    return params, targets


def _grads(W, T, k, j):
    # A little round-dependent noise so the momentum matters.
    gen = torch.Generator().manual_seed(1000 * k + j)
    return [w - t + 0.01 * torch.randn(w.shape, generator=gen) for w, t in zip(W, T)]


def _cfg(**kw):
    base = dict(task="lsq", workers=3, rounds=12, lr=0.05, beta=0.3, schedule="cosine", warmup=2, preset="muon",
                uplink="identity", downlink="identity")
    base.update(kw)
    return resolve(RunConfig(**base), {})


def _ns_reference(G, steps=5):
    """KellerJordan's quintic Newton-Schulz, written out independently of common/lmo.py."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.clone()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def _run(cfg, n=3, rounds=None, seed=0):
    names = [n_ for n_, _ in SHAPES]
    specs = assign_norms(SHAPES, preset=cfg.preset)
    params, targets = _problem(seed, n)
    server = ServerState(params, specs, cfg, n)
    workers = [WorkerState(params, specs, cfg, j) for j in range(n)]
    ups = {j: workers[j].init_uplink(_grads(workers[j].W, targets[j], 0, j)) for j in range(n)}
    server.aggregate(ups, init=True)
    return names, specs, params, targets, server, workers


def _round(server, workers, targets, k):
    """One round of docs/design.md §1 driven exactly as the simulator and the service drive it."""
    frames = server.step()
    ups = {}
    for j, w in enumerate(workers):
        w.apply_downlink(frames)
        ups[j] = w.make_uplink(_grads(w.W, targets[j], k, j))
    server.aggregate(ups)


def test_identity_both_ways_is_server_side_muon_on_the_averaged_momentum():
    # Prepare
    cfg = _cfg()
    n = 3
    names, specs, params, targets, server, workers = _run(cfg, n)
    X_ref = [p.clone() for p in params]
    M_ref = [_grads(params, targets[j], 0, j) for j in range(n)]
    for k in range(1, cfg.rounds + 1):
        # Execute: one networked-style round
        frames = server.step()
        ups = {}
        for j, w in enumerate(workers):
            w.apply_downlink(frames)
            ups[j] = w.make_uplink(_grads(w.W, targets[j], k, j))
        # Reference: single-process Muon step on the averaged momentum, then momentum update at the new X.
        t = lr_at(cfg, k)
        Gbar = [sum(M_ref[j][i] for j in range(n)) / n for i in range(len(SHAPES))]
        for i, s in enumerate(specs):
            if s.norm == "spectral":
                d = -_ns_reference(Gbar[i]) * math.sqrt(max(1.0, s.shape[0] / s.shape[1]))
            elif s.norm == "sign":
                d = -torch.sign(Gbar[i]) * s.scale
            else:
                d = -Gbar[i] / Gbar[i].pow(2).mean().sqrt() * s.scale
            X_ref[i] = X_ref[i] + t * s.lr_mult * d
        for j in range(n):
            g = _grads(X_ref, targets[j], k, j)
            M_ref[j] = [(1 - cfg.beta) * m + cfg.beta * gi for m, gi in zip(M_ref[j], g)]
        server.aggregate(ups)
        # Assert: W == X, G == mean M_j, G_j == M_j, and X matches the reference step
        for i in range(len(SHAPES)):
            torch.testing.assert_close(server.W[i], server.X[i], rtol=0, atol=1e-6)  # W + (X - W) rounds
            mean_m = sum(w.M[i] for w in workers) / n
            torch.testing.assert_close(server.G[i], mean_m, rtol=1e-5, atol=1e-6)
            for w in workers:
                assert torch.equal(w.Gj[i], w.M[i]) or torch.allclose(w.Gj[i], w.M[i], atol=1e-6)
            torch.testing.assert_close(server.X[i], X_ref[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("up,down", [("topk:0.2", "topk:0.3"), ("rankk:2", "rankk:2"), ("sign", "natural"),
                                     ("randk:0.3", "quant:4"), ("topk:0.2+bf16", "identity:bf16")])
def test_compressed_rounds_keep_both_sides_bit_identical(up, down):
    cfg = _cfg(uplink=up, downlink=down)
    n = 3
    _, specs, _, targets, server, workers = _run(cfg, n)
    for k in range(1, cfg.rounds + 1):
        _round(server, workers, targets, k)
        for i in range(len(specs)):
            for j, w in enumerate(workers):
                assert torch.equal(w.W[i], server.W[i]), "worker W must equal the server's W bit for bit"
                assert torch.equal(w.Gj[i], server.estimators[j][i]), "server copy of G_j must equal the worker's"
            mean_gj = sum(w.Gj[i] for w in workers) / n
            torch.testing.assert_close(server.G[i], mean_gj, rtol=1e-5, atol=1e-6)


def test_bad_uplink_is_rejected_and_state_untouched():
    cfg = _cfg(uplink="topk:0.2")
    _, specs, _, targets, server, workers = _run(cfg, 3)
    frames = server.step()
    ups = {}
    for j, w in enumerate(workers):
        w.apply_downlink(frames)
        ups[j] = w.make_uplink(_grads(w.W, targets[j], 1, j))
    before = [g.clone() for g in server.G]
    bad = dict(ups)
    bad[2] = list(ups[2])
    bad[2][1] = bad[2][1][:-3]  # truncated frame of one layer of the last client
    with pytest.raises(FrameError):
        server.aggregate(bad)
    with pytest.raises(FrameError):
        server.aggregate({0: ups[0][:-1]})  # a layer missing
    with pytest.raises(ProtocolError, match="unknown client"):
        server.aggregate({7: ups[0]})
    for g, b in zip(server.G, before):
        assert torch.equal(g, b)
    server.aggregate(ups)  # the good submission still applies


def test_schedules():
    cfg = _cfg(lr=1.0, rounds=10, warmup=2, schedule="linear")
    assert lr_at(cfg, 1) == pytest.approx(0.5)
    assert lr_at(cfg, 2) == pytest.approx(1.0)
    assert lr_at(cfg, 3) == pytest.approx(1.0)
    assert lr_at(cfg, 10) > 0
    assert [lr_at(cfg, k) for k in range(3, 11)] == sorted([lr_at(cfg, k) for k in range(3, 11)], reverse=True)
    cos = _cfg(lr=1.0, rounds=10, warmup=0, schedule="cosine")
    assert lr_at(cos, 1) == pytest.approx(1.0) and 0 < lr_at(cos, 10) < 0.05
    const = _cfg(lr=0.3, schedule="constant", warmup=0)
    assert {lr_at(const, k) for k in range(1, 13)} == {0.3}


def test_frame_seed_is_stable_and_distinct():
    assert frame_seed(0, 1, 5, 2, 3) == frame_seed(0, 1, 5, 2, 3)
    seeds = {frame_seed(0, d, k, i, j) for d in (1, 2) for k in range(5) for i in range(3) for j in range(3)}
    assert len(seeds) == 2 * 5 * 3 * 3


@pytest.mark.parametrize("variant", ["classic", "airbench"])
def test_ef14_runs_and_airbench_keeps_x_equal_w(variant):
    cfg = _cfg(method="ef14", ef14_variant=variant, uplink="topk:0.3", downlink="topk:0.3", ef14_bits=8)
    n = 3
    _, specs, _, targets, server, workers = _run(cfg, n)
    for k in range(1, cfg.rounds + 1):
        _round(server, workers, targets, k)
        for i in range(len(specs)):
            assert torch.isfinite(server.X[i]).all()
            assert torch.equal(workers[0].W[i], server.W[i])
            if variant == "airbench":
                assert torch.equal(server.X[i], server.W[i])
            # ef14: G is this round's mean message
            torch.testing.assert_close(server.G[i], sum(w.Gj[i] for w in workers) / n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["muon", "scion", "gluon", "muonmax"])
def test_presets_step_and_move_toward_targets(preset):
    cfg = _cfg(preset=preset, lr=0.02 if preset != "muonmax" else 0.002, rounds=30)
    n = 3
    _, specs, params, targets, server, workers = _run(cfg, n)
    mean_t = [sum(t[i] for t in targets) / n for i in range(len(specs))]
    dist0 = sum(float((p - t).pow(2).sum()) for p, t in zip(params, mean_t))
    for k in range(1, cfg.rounds + 1):
        _round(server, workers, targets, k)
    dist = sum(float((x - t).pow(2).sum()) for x, t in zip(server.X, mean_t))
    assert dist < dist0


def test_non_finite_gradient_is_refused_before_any_state_changes():
    cfg = _cfg(uplink="topk:0.2")
    _, specs, _, targets, server, workers = _run(cfg, 3)
    w = workers[0]
    w.apply_downlink(server.step())
    g = _grads(w.W, targets[0], 1, 0)
    g[1][0, 0] = float("nan")
    M_before = [m.clone() for m in w.M]
    with pytest.raises(ValueError, match="NaN/Inf"):
        w.make_uplink(g)
    assert all(torch.equal(a, b) for a, b in zip(w.M, M_before))


def _finite_cases(dtype):
    """(name, tensor) pairs for `all_finite`: every kind of non-finite entry at every position of
    sizes around the vector widths and the threads' chunk boundaries, views, and the degenerate shapes."""
    nan, inf = float("nan"), float("inf")
    gen = torch.Generator().manual_seed(0)
    yield "scalar", torch.tensor(1.5, dtype=dtype)
    yield "scalar nan", torch.tensor(nan, dtype=dtype)
    yield "scalar -inf", torch.tensor(-inf, dtype=dtype)
    for shape in [(0,), (0, 4), (4, 0), (2, 0, 3)]:
        yield f"empty {shape}", torch.empty(shape, dtype=dtype)
    top = torch.finfo(dtype).max  # finite, though their sum overflows: a check by sum would be wrong
    yield "finite at the largest magnitudes", torch.full((5,), top, dtype=dtype)
    yield "finite at the largest negative magnitudes", torch.full((5,), -top, dtype=dtype)
    for n in [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 257]:
        base = torch.randn(n, generator=gen).to(dtype)
        yield f"finite {n}", base
        yield f"all nan {n}", torch.full((n,), nan, dtype=dtype)
        yield f"all +inf {n}", torch.full((n,), inf, dtype=dtype)
        yield f"all -inf {n}", torch.full((n,), -inf, dtype=dtype)
        for pos in range(n):
            for v in (nan, -nan, inf, -inf):
                t = base.clone()
                t[pos] = v
                yield f"{v} at {pos}/{n}", t
            if n > 1:  # two kinds together: NaN beside an infinity, and both infinities
                t = base.clone()
                t[pos], t[(pos + 1) % n] = nan, inf
                yield f"nan+inf at {pos}/{n}", t
                t = base.clone()
                t[pos], t[(pos + 1) % n] = -inf, inf
                yield f"-inf+inf at {pos}/{n}", t
    big = torch.randn(1 << 20 | 3, generator=gen).to(dtype)  # split across threads by the reduction
    yield "finite 1M", big
    for pos in (0, big.numel() // 2 - 1, big.numel() // 2, big.numel() - 1):
        for v in (nan, inf, -inf):
            t = big.clone()
            t[pos] = v
            yield f"{v} at {pos}/1M", t
    m = torch.randn(65, 129, generator=gen).to(dtype)
    views = {"transposed": lambda x: x.t(), "strided": lambda x: x[:, ::2], "sliced": lambda x: x[1:, 3:],
             "expanded": lambda x: x[:1, :1].expand(40, 7)}
    for name, view in views.items():
        yield f"{name} finite", view(m)
        for v in (nan, inf, -inf):
            t = m.clone()
            view(t)[0, 0] = v  # inside the view
            yield f"{name} {v} inside", view(t)
            t = m.clone()
            view(t)[-1, -1] = v
            yield f"{name} {v} last", view(t)
    t = m.clone()
    t[0, 1] = float("nan")  # only in the entries the strided view skips: that view is finite
    yield "strided nan skipped", t[:, ::2]
    t = m.clone()
    t[0, :] = float("inf")  # only in the row the sliced view skips
    yield "sliced inf skipped", t[1:, 3:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_is_exactly_isfinite_all(dtype):
    cases = list(_finite_cases(dtype))
    assert any(not t.is_contiguous() for _, t in cases) and any(t.numel() == 0 for _, t in cases)
    wrong = [name for name, t in cases if all_finite(t) != bool(torch.isfinite(t).all())]
    assert not wrong, wrong
    expect = {"finite 1M": True, "finite at the largest magnitudes": True, "strided nan skipped": True, "sliced inf skipped": True, "scalar nan": False,
              "nan at 0/1": False, "-inf at 16/17": False, "transposed inf last": False, "empty (4, 0)": True}
    named = dict(cases)
    assert {k: all_finite(named[k]) for k in expect} == expect


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_uplink_is_refused_with_the_layer_named(value):
    from efmuon.common.compress import parse_spec

    cfg = _cfg()
    _, specs, _, targets, server, workers = _run(cfg, 3)
    identity = parse_spec("identity")
    rows = [[torch.ones(s) for _, s in SHAPES] for _ in range(3)]
    rows[1][2][3, 5] = value
    ups = {j: [identity.encode(t, 0) for t in r] for j, r in enumerate(rows)}
    before = [g.clone() for g in server.G]
    with pytest.raises(FrameError, match=r"client 1 uplink: layer h\.1\.weight: 1 non-finite value\(s\) \(NaN/Inf\)"):
        server.aggregate(ups)
    assert all(torch.equal(g, b) for g, b in zip(server.G, before))
    rows[1][2][3, 5] = 0.0
    server.aggregate({j: [identity.encode(t, 0) for t in r] for j, r in enumerate(rows)})

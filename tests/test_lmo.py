"""Tests for efmuon.common.lmo: Newton-Schulz, the per-norm LMOs, dual norms, presets."""

from __future__ import annotations

import math

import pytest
import torch
from efmuon.common.errors import ConfigError
from efmuon.common.lmo import (
    NORMS,
    PRESETS,
    SCALE_RULES,
    SCION_SIGN_LR_MULT,
    LayerSpec,
    SpectralGroup,
    assign_norms,
    assign_norms_for_model,
    available_cores,
    dual_norm,
    lmo_all,
    lmo_direction,
    lmo_threads,
    newton_schulz,
    ns_scalar_map,
    ns_singular_value_band,
    ns_step_flops,
    spectral_groups,
    spectral_scale,
)
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These matrices are tiny; intra-op threads only add contention on a shared 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Bands of the 5-step scalar map over normalised singular values in [1e-2, 1] (computed by
# ns_singular_value_band; numbers also in the research note's appendix):
#   jordan        [0.6818, 1.1344]
#   polar_express [0.8589, 1.1411]
BAND_LO = 1e-2
# fp32 rounding of 5 NS steps on matrices of these sizes moves singular values by <= 1e-5 (measured:
# jordan ~1e-6, polar_express up to 1.0e-5); 1e-4 leaves a margin without hiding a wrong polynomial.
SV_ATOL = 1e-4
# ||NS(G) - U V^T||_F / ||U V^T||_F = rms over i of (p(sigma_i) - 1): at most 0.318 (jordan) or
# 0.141 (polar_express) by the bands above; measured on these matrices: jordan 0.196-0.224,
# polar_express 0.090-0.097.
POLAR_RTOL = {"jordan": 0.35, "polar_express": 0.15}


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _controlled(m: int, n: int, gen: torch.Generator, kappa: float = 0.1) -> torch.Tensor:
    """m x n matrix with singular values log-spaced in [kappa, 1]."""
    r = min(m, n)
    s = torch.logspace(0, math.log10(kappa), r, dtype=torch.float64)
    U = _orthogonal(m, gen)[:, :r]
    V = _orthogonal(n, gen)[:, :r]
    return ((U * s) @ V.T).float()


def _make(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed({"wide": 1, "tall": 2, "square": 3, "batched": 4}[kind])
    if kind == "wide":
        return torch.randn(32, 128, generator=gen)
    if kind == "tall":
        return torch.randn(128, 32, generator=gen)
    if kind == "square":  # a square Gaussian is ill-conditioned: control its spectrum instead
        return _controlled(64, 64, gen)
    return torch.randn(3, 40, 20, generator=gen)


def _polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


# ------------------------------------------------------------------------------- Newton-Schulz


def test_band_numbers_match_documentation():
    lo, hi = ns_singular_value_band(BAND_LO, coeffs="jordan")
    assert lo == pytest.approx(0.6818, abs=1e-4) and hi == pytest.approx(1.1344, abs=1e-4)
    lo_pe, hi_pe = ns_singular_value_band(BAND_LO, coeffs="polar_express")
    assert lo_pe == pytest.approx(0.8589, abs=1e-4) and hi_pe == pytest.approx(1.1411, abs=1e-4)
    assert hi_pe - lo_pe < hi - lo  # Polar Express's band is tighter
    # 1e-3: jordan drops to 0.47, Polar Express stays above 0.84
    assert ns_singular_value_band(1e-3, coeffs="jordan")[0] == pytest.approx(0.4705, abs=1e-3)
    assert ns_singular_value_band(1e-3, coeffs="polar_express")[0] > 0.84


@pytest.mark.parametrize("coeffs", ["jordan", "polar_express"])
@pytest.mark.parametrize("kind", ["wide", "tall", "square", "batched"])
def test_newton_schulz_against_svd(kind, coeffs):
    G = _make(kind)
    O = newton_schulz(G, steps=5, coeffs=coeffs)
    assert O.shape == G.shape and O.dtype == G.dtype
    s_in = torch.linalg.svdvals(G.double())
    fro = G.double().norm(dim=(-2, -1), keepdim=True).squeeze(-1)
    s_norm = s_in / fro
    assert float(s_norm.min()) >= BAND_LO  # precondition of the documented band
    s_out = torch.linalg.svdvals(O.double())
    # 1. NS acts on singular values by the scalar map, exactly up to fp32 rounding
    predicted = ns_scalar_map(s_norm, 5, coeffs).sort(dim=-1, descending=True).values
    assert torch.allclose(s_out, predicted, atol=SV_ATOL, rtol=0)
    # 2. ... so they lie in the documented band
    lo, hi = ns_singular_value_band(BAND_LO, coeffs=coeffs)
    assert float(s_out.min()) >= lo - SV_ATOL and float(s_out.max()) <= hi + SV_ATOL
    # 3. singular vectors: close to the exact polar factor
    P = _polar(G)
    rel = float((O.double() - P).norm() / P.norm())
    assert rel < POLAR_RTOL[coeffs], rel


def test_newton_schulz_batched_equals_loop():
    G = _make("batched")
    O = newton_schulz(G)
    for i in range(G.shape[0]):
        assert torch.allclose(O[i], newton_schulz(G[i]), atol=1e-5)


def test_newton_schulz_zero_and_dtype_and_errors():
    Z = torch.zeros(8, 5)
    assert torch.equal(newton_schulz(Z), Z)
    G = torch.randn(16, 24)
    O16 = newton_schulz(G.half(), dtype=torch.float32)
    assert O16.dtype == torch.float16
    Ob = newton_schulz(G, dtype=torch.bfloat16)
    assert Ob.dtype == torch.float32
    assert float((Ob - newton_schulz(G)).abs().max()) < 0.05  # bf16 rounding only
    with pytest.raises(ValueError):
        newton_schulz(torch.randn(5))
    with pytest.raises(ConfigError, match="jordan"):
        newton_schulz(G, coeffs="nope")
    # steps > 5 repeat Polar Express's last triple (and still converge)
    s = torch.linalg.svdvals(newton_schulz(G, steps=8, coeffs="polar_express"))
    assert float(s.min()) > 0.85 and float(s.max()) < 1.15


def test_conv_spectral_via_lmo_direction():
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(16, 8, 3, 3, generator=gen)
    spec = LayerSpec("conv.weight", (16, 8, 3, 3), "spectral", 1.0)
    D = lmo_direction(G, spec)
    assert D.shape == G.shape
    M = -D.reshape(16, 72)
    s = torch.linalg.svdvals(M.double())
    lo, hi = ns_singular_value_band(BAND_LO)
    assert float(s.min()) >= lo - SV_ATOL and float(s.max()) <= hi + SV_ATOL
    P = _polar(G.reshape(16, 72))
    assert float((M.double() - P).norm() / P.norm()) < POLAR_RTOL["jordan"]


# ------------------------------------------------------------------------------- LMOs


def _spec(norm, shape, scale=1.0):
    return LayerSpec("p", tuple(shape), norm, scale)


def _own_norm(norm: str, Z: torch.Tensor) -> float:
    M = Z.double().reshape(Z.shape[0], -1) if Z.ndim >= 2 else Z.double().reshape(-1, 1)
    if norm == "spectral":
        return float(torch.linalg.matrix_norm(M, ord=2))
    if norm == "sign":
        return float(M.abs().max())
    if norm == "colnorm":
        return float(M.norm(dim=0).max())
    if norm == "rownorm":
        return float(M.norm(dim=1).max())
    return float(M.square().mean().sqrt())


def test_hand_computed_cases():
    G = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    assert torch.equal(lmo_direction(G, _spec("sign", (2, 2), 0.5)), torch.tensor([[-0.5, 0.5], [0.0, -0.5]]))
    b = torch.tensor([3.0, 4.0])
    rms = math.sqrt((9 + 16) / 2)
    assert torch.allclose(lmo_direction(b, _spec("bias_rms", (2,))), -b / rms)
    # columns of [[3, 0], [4, 2]] have norms 5 and 2
    C = torch.tensor([[3.0, 0.0], [4.0, 2.0]])
    assert torch.allclose(lmo_direction(C, _spec("colnorm", (2, 2))), -torch.tensor([[0.6, 0.0], [0.8, 1.0]]))
    # rows of [[3, 4], [0, 2]] have norms 5 and 2
    R = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert torch.allclose(lmo_direction(R, _spec("rownorm", (2, 2))), -torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    # spectral of a diagonal matrix diag(2, 1/2): polar factor is I, NS gives diag(p(.), p(.))
    D = torch.diag(torch.tensor([2.0, 0.5]))
    s = ns_scalar_map(torch.tensor([2.0, 0.5], dtype=torch.float64) / math.sqrt(4.25))
    assert torch.allclose(lmo_direction(D, _spec("spectral", (2, 2))), -torch.diag(s).float(), atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (6, 4, 3, 3)])
def test_unit_norm_and_descent(norm, shape):
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(*shape, generator=gen)
    scale = 0.37
    D = lmo_direction(G, _spec(norm, shape, scale))
    assert D.shape == G.shape and torch.isfinite(D).all()
    n = _own_norm(norm, D) / scale
    if norm == "spectral":  # NS: sigma_max lands in the band, not exactly at 1
        assert 0.68 <= n <= 1.135
    else:
        assert n == pytest.approx(1.0, rel=1e-5)
    assert float((G * D).sum()) < 0


@pytest.mark.parametrize("norm", NORMS)
def test_zero_gradient_gives_zero_direction(norm):
    for shape in ([(5, 7), (2, 3, 3, 3)] if norm == "spectral" else [(5, 7), (7,), ()]):
        if norm in ("colnorm", "rownorm", "sign") and len(shape) < 1:
            continue
        D = lmo_direction(torch.zeros(shape), _spec(norm, shape))
        assert torch.equal(D, torch.zeros(shape))
        assert dual_norm(torch.zeros(shape), _spec(norm, shape)) == 0.0


def test_half_precision_no_nan():
    for norm in ("colnorm", "rownorm", "bias_rms"):
        G = torch.zeros(4, 6, dtype=torch.float16)
        G[0, 0] = 1e-4
        D = lmo_direction(G, _spec(norm, (4, 6)))
        assert D.dtype == torch.float16 and torch.isfinite(D).all()


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        lmo_direction(torch.randn(3, 4), _spec("sign", (4, 3)))


def test_layerspec_validation():
    with pytest.raises(ConfigError, match="spectral, sign"):
        LayerSpec("x", (3, 3), "frobenius", 1.0)
    with pytest.raises(ConfigError, match=">= 2 dims"):
        LayerSpec("x", (3,), "spectral", 1.0)
    with pytest.raises(ConfigError, match="scale"):
        LayerSpec("x", (3, 3), "sign", 0.0)


@pytest.mark.parametrize("coeffs", ["jordan", "polar_express"])
def test_lmo_all_matches_per_layer(coeffs):
    gen = torch.Generator().manual_seed(11)
    shapes = [(32, 16), (32, 16), (16, 32), (32, 16), (32,), (8, 2, 2, 4), (8, 16), (50, 16), (5, 5)]
    norms = ["spectral", "spectral", "spectral", "spectral", "bias_rms", "spectral", "spectral", "sign", "colnorm"]
    specs = [LayerSpec(f"p{i}", s, n, 0.5 + i) for i, (s, n) in enumerate(zip(shapes, norms))]
    Gs = [torch.randn(*s, generator=gen) for s in shapes]
    batched = lmo_all(Gs, specs, coeffs=coeffs)
    for G, s, d in zip(Gs, specs, batched):
        ref = lmo_direction(G, s, coeffs=coeffs)
        assert d.shape == ref.shape
        assert torch.allclose(d, ref, atol=1e-5, rtol=0), s
    with pytest.raises(ValueError):
        lmo_all(Gs[:2], specs)


# ------------------------------------------------------------------------------- dual norms


@pytest.mark.parametrize("coeffs", ["jordan", "polar_express"])
def test_dual_norm_spectral_close_to_nuclear(coeffs):
    G = _make("wide")
    spec = _spec("spectral", G.shape, scale=2.0)
    nuclear = float(torch.linalg.svdvals(G.double()).sum())
    lo, hi = ns_singular_value_band(BAND_LO, coeffs=coeffs)
    est = dual_norm(G, spec, coeffs=coeffs)
    assert lo * nuclear <= est <= hi * nuclear
    # passing the step's direction gives the same number
    d = lmo_direction(G, spec, coeffs=coeffs)
    assert dual_norm(G, spec, direction=d) == pytest.approx(est, rel=1e-5)


def test_dual_norm_exact_norms():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(9, 13, generator=gen)
    g = G.double()
    assert dual_norm(G, _spec("sign", G.shape)) == pytest.approx(float(g.abs().sum()), rel=1e-12)
    d = lmo_direction(G, _spec("sign", G.shape, 1 / 13))
    assert dual_norm(G, _spec("sign", G.shape, 1 / 13), direction=d) == pytest.approx(float(g.abs().sum()), rel=1e-6)
    assert dual_norm(G, _spec("colnorm", G.shape)) == pytest.approx(float(g.norm(dim=0).sum()), rel=1e-12)
    assert dual_norm(G, _spec("rownorm", G.shape)) == pytest.approx(float(g.norm(dim=1).sum()), rel=1e-12)
    b = torch.tensor([3.0, 4.0])
    # -<b, -b/rms> = ||b||^2 / rms = 25 / sqrt(12.5) = sqrt(2) * 5
    assert dual_norm(b, _spec("bias_rms", (2,))) == pytest.approx(5 * math.sqrt(2), rel=1e-12)
    for norm in ("sign", "colnorm", "rownorm", "bias_rms"):
        spec = _spec(norm, G.shape, 0.3)
        assert dual_norm(G, spec, lmo_direction(G, spec)) == pytest.approx(dual_norm(G, spec), rel=1e-5)


# ------------------------------------------------------------------------------- presets


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 16)  # not matched by name: found via isinstance
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)


def _by_name(specs):
    return {s.name: s for s in specs}


@pytest.mark.parametrize("preset", PRESETS)
def test_assign_norms_for_model(preset):
    specs = assign_norms_for_model(_Tiny(), preset=preset)
    assert [s.name for s in specs] == [n for n, _ in _Tiny().named_parameters()]
    by = _by_name(specs)
    scion = preset in ("scion", "gluon")
    for name in ("conv.bias", "fc1.bias", "fc2.bias", "norm.weight", "norm.bias"):
        assert by[name].norm == "bias_rms" and by[name].scale == 1.0
    assert by["tok.weight"].norm == "sign" and by["tok.weight"].scale == pytest.approx(1 / 16)
    assert by["lm_head.weight"].norm == "sign" and by["lm_head.weight"].scale == pytest.approx(1 / 16)
    for name, shape in (("fc1.weight", (64, 16)), ("fc2.weight", (16, 64)), ("conv.weight", (8, 3, 3, 3))):
        assert by[name].norm == "spectral" and by[name].shape == shape
    assert by["fc1.weight"].scale == pytest.approx(2.0)  # both rules: sqrt(64/16)
    assert by["fc2.weight"].scale == pytest.approx(0.5 if scion else 1.0)
    assert by["conv.weight"].scale == pytest.approx(math.sqrt(8 / 27) if scion else 1.0)
    assert all(s.lr_mult == 1.0 for s in specs)


def test_assign_norms_name_patterns_and_lr_mult():
    named = [
        ("transformer.wte.weight", (100, 32)),
        ("model.embed_tokens.weight", (100, 32)),
        ("transformer.h.0.attn.c_attn.weight", (96, 32)),
        ("transformer.h.0.mlp.c_fc.bias", (128,)),
        ("classifier.weight", (10, 32)),
        ("encoder.layer.0.output.dense.weight", (32, 128)),
        ("scalar", ()),
        ("custom.out_proj.weight", (10, 32)),
    ]
    specs = _by_name(assign_norms(named, head_names={"custom.out_proj.weight"}, lr_mult={"sign": SCION_SIGN_LR_MULT}))
    assert specs["transformer.wte.weight"].norm == "sign"
    assert specs["model.embed_tokens.weight"].norm == "sign"
    assert specs["classifier.weight"].norm == "sign"
    assert specs["custom.out_proj.weight"].norm == "sign"
    assert specs["transformer.h.0.attn.c_attn.weight"].norm == "spectral"
    assert specs["encoder.layer.0.output.dense.weight"].norm == "spectral"
    assert specs["transformer.h.0.mlp.c_fc.bias"].norm == "bias_rms"
    assert specs["scalar"].norm == "bias_rms" and specs["scalar"].shape == ()
    assert specs["classifier.weight"].lr_mult == 60.0
    assert specs["transformer.h.0.attn.c_attn.weight"].lr_mult == 1.0
    with pytest.raises(ConfigError, match="bias_rms"):
        assign_norms(named, lr_mult={"embed": 2.0})


def test_assign_norms_overrides():
    named = [("fc1.weight", (64, 16)), ("fc2.weight", (16, 64)), ("fc2.bias", (16,)), ("emb.weight", (50, 16))]
    specs = _by_name(
        assign_norms(
            named,
            preset="muon",
            overrides={
                "fc1.*": "colnorm",  # fnmatch glob
                r"fc2\.w.*": "spectral:moonlight",  # regex
                "*.bias": "sign:0.25",  # explicit scale
                "fc*": "rownorm",  # never reached for fc1/fc2: first match wins
                "emb.weight": "rownorm",
            },
        )
    )
    assert specs["fc1.weight"].norm == "colnorm" and specs["fc1.weight"].scale == pytest.approx(8.0)
    assert specs["fc2.weight"].norm == "spectral" and specs["fc2.weight"].scale == pytest.approx(0.2 * 8)
    assert specs["fc2.bias"].norm == "sign" and specs["fc2.bias"].scale == 0.25
    assert specs["emb.weight"].norm == "rownorm" and specs["emb.weight"].scale == pytest.approx(0.25)


def test_assign_norms_errors():
    named = [("fc.weight", (4, 4)), ("fc.bias", (4,))]
    with pytest.raises(ConfigError) as e:
        assign_norms(named, preset="adam")
    assert all(p in str(e.value) for p in PRESETS)
    with pytest.raises(ConfigError) as e:
        assign_norms(named, overrides={"fc.*": "frobenius"})
    assert all(n in str(e.value) for n in NORMS)
    with pytest.raises(ConfigError, match="spectral layers only"):
        assign_norms(named, overrides={"fc.*": "sign:muon"})
    with pytest.raises(ConfigError, match="neither a scale rule"):
        assign_norms(named, overrides={"fc.*": "spectral:huge"})
    with pytest.raises(ConfigError, match=">= 2 dims"):
        assign_norms(named, overrides={"fc.bias": "spectral"})
    with pytest.raises(ConfigError) as e:
        spectral_scale((4, 4), "kj")
    assert all(r in str(e.value) for r in SCALE_RULES)


def test_spectral_scale_rules():
    assert spectral_scale((768, 3072), "muon") == 1.0
    assert spectral_scale((3072, 768), "muon") == pytest.approx(2.0)
    assert spectral_scale((768, 3072), "scion") == pytest.approx(0.5)
    assert spectral_scale((768, 3072), "moonlight") == pytest.approx(0.2 * math.sqrt(3072))
    assert spectral_scale((64, 16, 3, 3), "scion") == pytest.approx(math.sqrt(64 / 144))


# ------------------------------------------------------------------------------- reference step


def _kj_muon_step(p, grad, buf, lr, beta, dtype):
    """One step of KellerJordan/Muon's recipe (no Nesterov, no weight decay), written out by hand."""
    buf = beta * buf + (1 - beta) * grad
    X = buf.to(dtype)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        XXt = X @ X.T
        X = a * X + b * (XXt @ X) + c * (XXt @ (XXt @ X))
    if tall:
        X = X.T
    update = X.float() * max(1, p.shape[0] / p.shape[1]) ** 0.5
    return p - lr * update, buf


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_one_muon_step_matches_reference(shape):
    gen = torch.Generator().manual_seed(13)
    p0 = torch.randn(*shape, generator=gen)
    buf0 = torch.randn(*shape, generator=gen)
    grad = torch.randn(*shape, generator=gen)
    lr, beta = 0.02, 0.9
    spec = assign_norms([("h.weight", shape)], preset="muon")[0]
    # ours: momentum (EMA form) then X += lr * lmo(M)
    M = beta * buf0 + (1 - beta) * grad
    ours = p0 + lr * spec.lr_mult * lmo_direction(M, spec)
    hand, _ = _kj_muon_step(p0, grad, buf0, lr, beta, torch.float32)
    assert torch.allclose(ours, hand, atol=1e-6, rtol=0)

    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon not available")
    # torch.optim.Muon always runs NS in bf16 and starts from a zero buffer: first step, buf = (1-beta) g
    param = nn.Parameter(p0.clone())
    opt = torch.optim.Muon([param], lr=lr, momentum=beta, nesterov=False, weight_decay=0.0, adjust_lr_fn="original")
    param.grad = grad.clone()
    opt.step()
    ours_bf16 = p0 + lr * lmo_direction_bf16((1 - beta) * grad, spec)
    # same fused bf16 ops: update entries (max ~0.55) agree to ~6e-6 (measured); allow 1e-3
    assert torch.allclose(param.detach(), ours_bf16, atol=lr * 1e-3, rtol=0)
    # and against our fp32 path: bf16 rounding, measured max 0.015 on the update (rel. Frobenius 1.6%)
    ours_fp32 = p0 + lr * lmo_direction((1 - beta) * grad, spec)
    assert float((param.detach() - ours_fp32).abs().max()) < lr * 0.05


def lmo_direction_bf16(G, spec):
    return -spec.scale * newton_schulz(G, dtype=torch.bfloat16)


# ------------------------------------------------------------------------------- batching and padding


def test_spectral_groups_plan():
    # gpt-char's spectral matrices: same short side 64; 64x256 and 256x64 share a batch (transposed in),
    # while padding 64x64 to 64x256 would triple its FLOPs: it keeps its own batch
    shapes = [(192, 64), (64, 64), (256, 64), (64, 256)] * 2
    groups = spectral_groups(shapes)
    assert sorted(i for g in groups for i in g.idx) == list(range(len(shapes)))
    by_members = {tuple(sorted(g.idx)): g for g in groups}
    assert by_members[(1, 5)] == SpectralGroup((1, 5), 64, 64, False)
    assert by_members[(0, 4)] == SpectralGroup((0, 4), 192, 64, False)
    assert by_members[(2, 3, 6, 7)].padded and (by_members[(2, 3, 6, 7)].rows, by_members[(2, 3, 6, 7)].cols) == (64, 256)
    # tiny matrices of different long sides are zero-padded into one batch when that saves calls ...
    tiny = spectral_groups([(8, 16), (8, 20), (24, 8)])
    assert tiny == [SpectralGroup((0, 1, 2), 8, 24, True)]
    # ... large ones never (the padding would cost more than a call)
    big = spectral_groups([(256, 1024), (256, 1000), (768, 768)])
    assert all(not g.padded for g in big) and len(big) == 3
    # the executed FLOPs of a plan count the padding
    assert tiny[0].step_flops == 3 * ns_step_flops(8, 24)
    assert ns_step_flops(64, 256) == ns_step_flops(256, 64) == 4 * 64 * 64 * 256 + 2 * 64 ** 3


@pytest.mark.parametrize("coeffs", ["jordan", "polar_express"])
def test_padded_batch_matches_unpadded_and_svd(coeffs):
    """Zero padding commutes with the normalisation and the quintic steps: the padded batch equals
    each matrix's own Newton-Schulz to fp32 rounding, and is as close to the SVD polar factor."""
    gen = torch.Generator().manual_seed(21)
    shapes = [(16, 40), (40, 16), (16, 16), (16, 28), (28, 16)]
    Gs = [_controlled(m, n, gen) for m, n in shapes]
    specs = [LayerSpec(f"w{i}", s, "spectral", 1.0) for i, s in enumerate(shapes)]
    groups = spectral_groups(shapes)
    assert any(g.padded and len(g.idx) >= 3 for g in groups), groups  # the case under test really pads
    batched = lmo_all(Gs, specs, coeffs=coeffs)
    s_band = ns_singular_value_band(BAND_LO, coeffs=coeffs)
    for G, d in zip(Gs, batched):
        own = -newton_schulz(G, coeffs=coeffs)
        assert d.shape == G.shape and d.is_contiguous()
        assert torch.allclose(d, own, atol=1e-5, rtol=0)
        s_out = torch.linalg.svdvals(d.double())
        assert float(s_out.min()) >= s_band[0] - SV_ATOL and float(s_out.max()) <= s_band[1] + SV_ATOL
        P = _polar(G)
        rel_padded = float((-d.double() - P).norm() / P.norm())
        rel_own = float((own.double() + P).norm() / P.norm())
        assert rel_padded < POLAR_RTOL[coeffs] and abs(rel_padded - rel_own) < 1e-5


def test_lmo_all_thread_count_restored():
    """lmo_all runs Newton-Schulz on the thread count it is given (or lmo_threads') and restores the
    caller's. The bits may depend on the thread count (MKL/AVX-512 sgemm splits its sums by thread), so
    only closeness is asserted: what makes `simulate` and `run` agree bit for bit is that both take the
    same thread count for the same call on the same machine, not thread invariance."""
    gen = torch.Generator().manual_seed(22)
    shapes = [(64, 256), (256, 64), (96, 96)]
    Gs = [torch.randn(*s, generator=gen) for s in shapes]
    specs = [LayerSpec(f"w{i}", s, "spectral", 1.0) for i, s in enumerate(shapes)]
    before = torch.get_num_threads()
    one = lmo_all(Gs, specs, threads=1)
    assert torch.get_num_threads() == before
    two = lmo_all(Gs, specs, threads=2)
    assert torch.get_num_threads() == before
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order
    # small work keeps the process's setting; large work uses every available core
    assert lmo_threads(1e6) == torch.get_num_threads()
    assert lmo_threads(1e12) >= available_cores()

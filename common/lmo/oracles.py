"""The linear minimisation oracles themselves: the unit-ball LMO of each norm (spectral through
Newton-Schulz, sign, colnorm, rownorm, bias_rms), `lmo_direction` for one layer, `lmo_all` for a
model (spectral layers batched as `batching` says) and the dual norms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .batching import _ns_group, lmo_threads, ns_step_flops, spectral_groups
from .newton_schulz import newton_schulz
from .norms import NORMS, LayerSpec, block_dims, matrix_dims

_EPS = 1e-12  # guards the column/row/rms divisions (computed in fp32 or wider)


def _as_matrix(G: Tensor, stacked: bool = False) -> Tensor:
    """The (rows, cols) view of G, or for a stacked parameter the (E, rows, cols) view of its experts."""
    if stacked:
        rows, cols = matrix_dims(G.shape[1:])
        return G.reshape(G.shape[0], rows, cols)
    rows, cols = matrix_dims(G.shape)
    return G.reshape(rows, cols)


def _check(G: Tensor, spec: LayerSpec) -> None:
    if tuple(G.shape) != spec.shape:
        raise ValueError(
            f"layer {spec.name!r}: tensor shape {tuple(G.shape)} does not match spec shape {spec.shape}"
        )


def _wide(G: Tensor) -> Tensor:
    """fp32 (or wider) copy of G for the norm computations, so eps guards survive fp16/bf16."""
    return G if G.dtype in (torch.float32, torch.float64) else G.float()


def _unit_sign(G: Tensor) -> Tensor:
    """argmin_{max|Z_ij| <= 1} <G, Z> = -sign(G)   (zeros stay zero)."""
    return -torch.sign(G)


def _unit_colnorm(G: Tensor, stacked: bool = False) -> Tensor:
    """argmin_{max_j ||Z[:,j]||_2 <= 1} <G, Z> = -G[:,j] / ||G[:,j]||_2 per column (per expert)."""
    M = _wide(_as_matrix(G, stacked))
    M = M / M.norm(dim=-2, keepdim=True).clamp_min(_EPS)
    return (-M).reshape(G.shape).to(G.dtype)


def _unit_rownorm(G: Tensor, stacked: bool = False) -> Tensor:
    """argmin_{max_i ||Z[i,:]||_2 <= 1} <G, Z> = -G[i,:] / ||G[i,:]||_2 per row (per expert)."""
    M = _wide(_as_matrix(G, stacked))
    M = M / M.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return (-M).reshape(G.shape).to(G.dtype)


def _unit_bias_rms(G: Tensor) -> Tensor:
    """argmin_{rms(Z) <= 1} <G, Z> = -G / rms(G),  rms(G) = sqrt(mean G^2)."""
    W = _wide(G)
    rms = W.square().mean().sqrt().clamp_min(_EPS)
    return (-W / rms).to(G.dtype)


def _unit_spectral(G: Tensor, ns_steps: int, coeffs: str, stacked: bool = False) -> Tensor:
    """argmin_{sigma_max(Z) <= 1} <G, Z> = -U V^T  (via Newton-Schulz on the (out, rest) view; for a
    stacked parameter ONE batched Newton-Schulz call on the (E, rows, cols) stack, each expert's matrix
    orthogonalised (and Frobenius-normalised) separately)."""
    return (-newton_schulz(_as_matrix(G, stacked), ns_steps, coeffs)).reshape(G.shape)


def _unit_lmo(G: Tensor, norm: str, ns_steps: int, coeffs: str, stacked: bool = False) -> Tensor:
    if G.numel() == 0:
        return torch.zeros_like(G)
    if norm == "spectral":
        return _unit_spectral(G, ns_steps, coeffs, stacked)
    if norm == "sign":
        return _unit_sign(G)
    if norm == "colnorm":
        return _unit_colnorm(G, stacked)
    if norm == "rownorm":
        return _unit_rownorm(G, stacked)
    if norm == "bias_rms":
        return _unit_bias_rms(G)
    raise ConfigError(f"unknown norm {norm!r}; valid norms are {', '.join(NORMS)}")


def lmo_direction(G: Tensor, spec: LayerSpec, ns_steps: int = 5, coeffs: str = "jordan") -> Tensor:
    """lmo(G) = spec.scale * argmin_{||Z||_(spec.norm) <= 1} <G, Z>   (a descent direction).

    spectral: -scale * NS(G)  (~ -scale * U V^T; conv (out, in, k, k) via the (out, in*k*k) view)
    sign:     -scale * sign(G)
    colnorm:  -scale * G[:,j] / ||G[:,j]||_2      rownorm: -scale * G[i,:] / ||G[i,:]||_2
    bias_rms: -scale * G / rms(G)
    A zero G gives a zero direction.  The result has G's shape and dtype.
    """
    _check(G, spec)
    return _unit_lmo(G, spec.norm, ns_steps, coeffs, spec.stacked) * spec.scale


def _plan_flops(groups, experts: Sequence[LayerSpec]) -> int:
    """FLOPs of one Newton-Schulz step over `groups` (spectral_groups) and the stacked `experts`."""
    flops = sum(g.step_flops for g in groups)
    for s in experts:
        e, rows, cols = block_dims(s)
        flops += e * ns_step_flops(rows, cols)
    return flops


def lmo_all_threads(specs: Sequence[LayerSpec], ns_steps: int = 5) -> int:
    """The thread count `lmo_all(Gs, specs, ns_steps, threads=None)` picks for non-empty float32 tensors of
    `specs`' shapes on one device: a caller that splits one call into several (the pipelined step) passes
    this count to each, so every piece runs as the whole call would."""
    idx = [i for i, s in enumerate(specs) if s.norm == "spectral" and not s.stacked
           and all(int(d) for d in s.shape)]
    experts = [s for s in specs if s.norm == "spectral" and s.stacked and all(int(d) for d in s.shape)]
    groups = spectral_groups([matrix_dims(specs[i].shape) for i in idx]) if idx else []
    return lmo_threads(ns_steps * _plan_flops(groups, experts))


def lmo_all(
    Gs: Sequence[Tensor],
    specs: Sequence[LayerSpec],
    ns_steps: int = 5,
    coeffs: str = "jordan",
    threads: int | None = None,
) -> list[Tensor]:
    """[lmo_direction(G, s) for G, s in zip(Gs, specs)], with spectral layers batched.

    Spectral layers (per dtype and device) are batched as `spectral_groups` says: same-size matrices
    of either orientation in one Newton-Schulz call, tiny ones of different long sides zero-padded
    into one when that saves more than it costs.  A stacked (per-expert) spectral layer is one batched
    call on its own (E, rows, cols) stack.  The result equals the per-layer one to float rounding;
    every direction is a fresh contiguous tensor.

    threads: torch intra-op threads for the Newton-Schulz products; None = `lmo_threads(flops)`
    (every core this process may use once the work is large enough).  The thread count is restored
    afterwards.  The simulator and the networked server both step through this function, so they
    use the same count on the same machine.
    """
    if len(Gs) != len(specs):
        raise ValueError(f"lmo_all: {len(Gs)} tensors but {len(specs)} layer specs")
    out: list[Tensor | None] = [None] * len(Gs)
    by_kind: dict[tuple, list[int]] = {}
    experts: list[int] = []  # stacked spectral layers: one batched Newton-Schulz call each
    for i, (G, spec) in enumerate(zip(Gs, specs)):
        _check(G, spec)
        if spec.norm == "spectral" and G.numel() > 0:
            if spec.stacked:
                experts.append(i)
            else:
                by_kind.setdefault((G.dtype, G.device), []).append(i)
        else:
            out[i] = lmo_direction(G, spec, ns_steps, coeffs)
    plan = [(idx, g) for idx in by_kind.values()
            for g in spectral_groups([matrix_dims(specs[i].shape) for i in idx])]
    if threads is None:
        threads = lmo_threads(ns_steps * _plan_flops([g for _, g in plan], [specs[i] for i in experts]))
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        for idx, group in plan:
            members = [idx[j] for j in group.idx]
            mats = [_as_matrix(Gs[i]) for i in members]
            for i, O in zip(members, _ns_group(mats, group, ns_steps, coeffs)):
                D = torch.empty(O.shape, dtype=Gs[i].dtype, device=O.device)
                torch.mul(O, -specs[i].scale, out=D)  # = (-O) * scale exactly, cast and made contiguous
                out[i] = D.view(specs[i].shape)
        for i in experts:
            out[i] = lmo_direction(Gs[i], specs[i], ns_steps, coeffs).contiguous()
    finally:
        if threads != previous:
            torch.set_num_threads(previous)
    return out  # type: ignore[return-value]


def dual_norm(
    G: Tensor,
    spec: LayerSpec,
    direction: Tensor | None = None,
    ns_steps: int = 5,
    coeffs: str = "jordan",
) -> float:
    """||G||_* of the layer's norm:  ||G||_* = max_{||Z||<=1} <G, Z> = -<G, lmo_unit(G)>.

    With `direction` (= lmo_direction(G, spec), e.g. reused from the step) this returns
    -<G, direction> / spec.scale.  Without it, the exact closed form for sign (||G||_1),
    colnorm (sum_j ||G[:,j]||_2), rownorm (sum_i ||G[i,:]||_2) and bias_rms (sqrt(n) ||G||_2),
    and -<G, -NS(G)> = sum_i sigma_i p(sigma_i / ||G||_F) for spectral.  A stacked (per-expert)
    parameter's dual norm is the sum of its experts' dual norms.

    The spectral value is APPROXIMATE: it is the nuclear norm sum_i sigma_i weighted by the
    Newton-Schulz output singular values p(.), which lie in the band documented in `newton_schulz`
    (about [0.68, 1.13] for jordan), so the estimate lies within that factor band of the exact
    nuclear norm.  Use torch.linalg.svdvals(G).sum() when exactness matters.  Accumulates in float64.
    """
    _check(G, spec)
    if G.numel() == 0:
        return 0.0
    if direction is not None:
        if direction.shape != G.shape:
            raise ValueError(f"dual_norm: direction shape {tuple(direction.shape)} != {tuple(G.shape)}")
        return float(-(G.double() * direction.double()).sum() / spec.scale)
    g = G.double()
    if spec.norm == "sign":
        return float(g.abs().sum())
    if spec.norm == "colnorm":
        return float(_as_matrix(g, spec.stacked).norm(dim=-2).sum())
    if spec.norm == "rownorm":
        return float(_as_matrix(g, spec.stacked).norm(dim=-1).sum())
    if spec.norm == "bias_rms":
        return float(math.sqrt(g.numel()) * g.norm())
    return float(-(g * _unit_spectral(G, ns_steps, coeffs, spec.stacked).double()).sum())



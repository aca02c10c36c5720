"""The Newton-Schulz iteration that approximates the polar factor U V^T of the spectral LMO: its
quintic coefficient schedules (KellerJordan/Muon's "jordan", Polar Express), the Frobenius
normalisation, the batched iteration itself, and what it does to one singular value (the band the
results land in)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError

# Quintic Newton-Schulz schedules: one (a, b, c) per step,  X <- a X + b (X X^T) X + c (X X^T)^2 X.
NS_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    # KellerJordan/Muon: the same triple on every step.
    "jordan": ((3.4445, -4.7750, 2.0315),),
    # Polar Express (Amsel et al., arXiv 2505.16932), as in modded-nanogpt record #40:
    # computed for num_iters=5, safety_factor=2e-2, cushion=2.  Steps beyond 5 repeat the last.
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
# Normalisation X / (||X||_F * factor + eps) applied before the first step.
_NS_NORMALISATION = {"jordan": (1.0, 1e-7), "polar_express": (1.0 + 2e-2, 1e-6)}


def _schedule(coeffs: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    if coeffs not in NS_COEFFICIENTS:
        raise ConfigError(
            f"unknown Newton-Schulz coefficients {coeffs!r}; valid: {', '.join(NS_COEFFICIENTS)}"
        )
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"Newton-Schulz steps must be an int >= 0, got {steps!r}")
    table = NS_COEFFICIENTS[coeffs]
    return tuple(table[min(k, len(table) - 1)] for k in range(steps))


def ns_scalar_map(sigma: Tensor, steps: int = 5, coeffs: str = "jordan") -> Tensor:
    """What Newton-Schulz does to one (already normalised) singular value.

        s_0 = sigma,   s_{k+1} = a_k s_k + b_k s_k^3 + c_k s_k^5.

    NS(G) = U diag(p(sigma_i / nu)) V^T exactly (in exact arithmetic), where p is this map and
    nu = ||G||_F (jordan) or 1.02 ||G||_F (polar_express).  Polar Express's 1.02 is folded in
    here: pass sigma / ||G||_F for both schedules.
    """
    factor, _ = _NS_NORMALISATION[coeffs] if coeffs in _NS_NORMALISATION else (1.0, 0.0)
    s = sigma / factor
    for a, b, c in _schedule(coeffs, steps):
        s2 = s * s
        s = s * (a + s2 * (b + c * s2))
    return s


def ns_singular_value_band(
    lo: float, hi: float = 1.0, steps: int = 5, coeffs: str = "jordan", points: int = 200_001
) -> tuple[float, float]:
    """(min, max) of `ns_scalar_map` over sigma in [lo, hi] (log grid, float64).

    Examples (5 steps): jordan [1e-2, 1] -> (0.682, 1.134); polar_express [1e-2, 1] -> (0.859, 1.141)
    (printed by the tests).  After Frobenius normalisation sigma_max/||G||_F is in [1/sqrt(r), 1]
    (r = rank), so a matrix with sigma_min/sigma_max >= kappa has normalised singular values in
    [kappa/sqrt(r), 1].
    """
    grid = torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64)
    out = ns_scalar_map(grid, steps, coeffs)
    return float(out.min()), float(out.max())


def newton_schulz(
    G: Tensor, steps: int = 5, coeffs: str = "jordan", dtype: torch.dtype | None = None
) -> Tensor:
    """Approximate polar factor U V^T of G = U S V^T, batched over leading dims of (..., m, n).

        X_0     = G / (||G||_F + 1e-7)                       ('jordan')
                  G / (||G||_F * 1.02 + 1e-6)                 ('polar_express')
        A_k     = X_k X_k^T
        X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k  =  U diag(p_k(s)) V^T

    with (a, b, c) = (3.4445, -4.7750, 2.0315) on every step ('jordan', KellerJordan/Muon) or the
    5-step Polar Express schedule (steps > 5 repeat its last triple).  When m > n the iteration uses
    A_k = X_k^T X_k and X_{k+1} = a_k X_k + X_k (b_k A_k + c_k A_k^2) (the same polynomial, no
    transpose materialised), so the Gram matrix is always min(m, n)^2.  The result is U S' V^T, not
    exactly U V^T: for normalised singular values in [1e-2, 1], 5 jordan steps give S' in
    [0.682, 1.134] and 5 Polar Express steps give [0.859, 1.141] (see `ns_singular_value_band`).
    A zero G maps to zero.

    dtype: compute dtype; default bfloat16 on CUDA (as every reference does), float32 elsewhere.
    The result has G's dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    schedule = _schedule(coeffs, steps)
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    lead, (m, n) = G.shape[:-2], G.shape[-2:]
    X = G.reshape(-1, m, n).to(dtype, copy=True)  # our own buffer: normalised in place below
    _normalise_(X, coeffs)
    X = _ns_iterate(X, schedule, tall=m > n)
    return X.reshape(*lead, m, n).to(G.dtype)


def _normalise_(X: Tensor, coeffs: str) -> None:
    """X[i] /= ||X[i]||_F * factor + eps, in place, for a (batch, m, n) X (zero padding changes no norm)."""
    factor, eps = _NS_NORMALISATION[coeffs]
    d = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X.div_(d.mul_(factor).add_(eps))


def _ns_iterate(X: Tensor, schedule, tall: bool) -> Tensor:
    """The quintic steps on a normalised (batch, m, n) X that the caller owns (it is overwritten).

    Per step: A = X X^T (bmm), B = b A + c A A (one baddbmm: beta/alpha do the scaling), then
    X' = a X + B X.  In fp32/fp64 that is B += a I (the diagonal only) and X' = B X, one bmm that
    never copies X (baddbmm(X, B, X, beta=a) copies X into its output first: a full pass over the
    largest operand each step).  In 16-bit formats a ~3.4 + B_ii would lose B's diagonal to rounding,
    so there X' = baddbmm(X, B, X, beta=a) as in the references.  Buffers are allocated once per
    call; X / X' swap.  Tall X (m > n) multiplies on the right (X^T X, X B): no transpose."""
    r = X.size(-1) if tall else X.size(-2)
    A = X.new_empty(X.size(0), r, r)
    B = torch.empty_like(A)
    fold = X.dtype in (torch.float32, torch.float64)
    diag = B.diagonal(dim1=-2, dim2=-1)
    Y = torch.empty_like(X)
    for a, b, c in schedule:
        if tall:
            torch.bmm(X.mT, X, out=A)
        else:
            torch.bmm(X, X.mT, out=A)
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
        if fold:
            diag.add_(a)
        left, right = (X, B) if tall else (B, X)
        if fold:
            torch.bmm(left, right, out=Y)
        else:
            torch.baddbmm(X, left, right, beta=a, out=Y)
        X, Y = Y, X
    return X


"""Linear minimisation oracles (LMOs) for the Muon / Scion / Gluon family, one per layer norm.

Every layer i of the model carries a norm ||.||_(i) (chosen by a preset, docs/design.md §3) and the
server's step is

    X_i  <-  X_i + t_i * lmo_i(G_i),      lmo_i(G) = scale_i * argmin_{||Z||_(i) <= 1} <G, Z>.

So a direction returned here already points *downhill* (it is the negative of what Muon/Scion code
usually calls "the update", which they subtract).  Unit balls, their LMOs and dual norms, for a
layer whose weight is viewed as a matrix G of shape (rows, cols) = (d_out, d_in) (PyTorch (out, in);
conv filters (out, in, k, k) are flattened to (out, in*k*k)):

    norm        ||Z||                      argmin_{||Z||<=1} <G, Z>        ||G||_* (dual)
    spectral    sigma_max(Z)               -U V^T   (G = U S V^T)          sum_i sigma_i(G)  (nuclear)
    sign        max_ij |Z_ij|              -sign(G)                        sum_ij |G_ij|     (l1)
    colnorm     max_j ||Z[:, j]||_2        -G[:, j] / ||G[:, j]||_2        sum_j ||G[:, j]||_2
    rownorm     max_i ||Z[i, :]||_2        -G[i, :] / ||G[i, :]||_2        sum_i ||G[i, :]||_2
    bias_rms    rms(Z) = ||Z||_2/sqrt(n)   -G / rms(G)                     sqrt(n) ||G||_2

The polar factor U V^T is approximated by a Newton-Schulz iteration (KellerJordan/Muon's quintic or
the Polar Express schedule), so the spectral LMO and its dual norm are approximate; see
`newton_schulz` for the band the singular values land in.  All other LMOs are exact (up to eps).

Scales (`LayerSpec.scale`) follow the reference implementations (rows = d_out, cols = d_in):
    spectral  muon:      sqrt(max(1, rows/cols))        (KellerJordan/Muon, torch "original")
              scion:     sqrt(rows/cols)                (Scion Spectral(normalized=True), Gluon unScion)
              moonlight: 0.2 * sqrt(max(rows, cols))    (Moonlight / torch "match_rms_adamw")
    sign      1/d_in                                    (Scion Sign(normalized=True); Gluon's n_p)
    colnorm   sqrt(d_out)                               (Scion ColNorm(normalized=False))
    rownorm   1/sqrt(d_in)                              (Scion RowNorm(normalized=True))
    bias_rms  1                                         (Scion BiasRMS)
Conv filters use the flattened (out, in*k*k) shape for the spectral scale, i.e. sqrt(out/in)/k for
'scion'; Scion's SpectralConv uses sqrt(out/in)/k^2 instead -- pass "spectral:<float>" to match it.

Modules: ``norms`` (LayerSpec, presets, scale rules, `assign_norms`), ``oracles`` (the unit LMOs,
`lmo_direction`, `lmo_all`, `dual_norm`), ``newton_schulz`` (coefficients, iteration, singular-value
band), ``batching`` (Newton-Schulz batches, FLOPs, thread policy).
"""

from __future__ import annotations

from .batching import (
    LMO_PARALLEL_MIN_FLOPS,
    PAD_CALL_FLOPS,
    SpectralGroup,
    available_cores,
    lmo_threads,
    lmo_blocks,
    lmo_units,
    ns_step_flops,
    spectral_groups,
)
from .newton_schulz import NS_COEFFICIENTS, newton_schulz, ns_scalar_map, ns_singular_value_band
from .norms import (
    EMBEDDING_PATTERN,
    HEAD_PATTERN,
    NORMS,
    PRESETS,
    SCALE_RULES,
    SCION_SIGN_LR_MULT,
    LayerSpec,
    assign_norms,
    EXPERT_PATTERN,
    assign_norms_for_model,
    block_dims,
    matrix_dims,
    spectral_scale,
)
from .oracles import dual_norm, lmo_all, lmo_all_threads, lmo_direction

__all__ = [
    "NORMS",
    "SCALE_RULES",
    "PRESETS",
    "NS_COEFFICIENTS",
    "SCION_SIGN_LR_MULT",
    "LayerSpec",
    "SpectralGroup",
    "available_cores",
    "matrix_dims",
    "block_dims",
    "EXPERT_PATTERN",
    "newton_schulz",
    "ns_scalar_map",
    "ns_singular_value_band",
    "lmo_direction",
    "lmo_all",
    "lmo_all_threads",
    "lmo_threads",
    "lmo_blocks",
    "lmo_units",
    "ns_step_flops",
    "spectral_groups",
    "dual_norm",
    "spectral_scale",
    "assign_norms",
    "assign_norms_for_model",
    "PAD_CALL_FLOPS",
    "LMO_PARALLEL_MIN_FLOPS",
    "EMBEDDING_PATTERN",
    "HEAD_PATTERN",
]

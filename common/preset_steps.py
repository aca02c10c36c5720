"""The server-side state of the presets whose step is not the LMO's alone: MuonMax-Momo's model truncation
and AdamW's moments (`PresetSteps`, a part of `algorithm.ServerState`; docs/design.md §3). Kept apart so
that algorithm.py stays the round of §1."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


class PresetSteps:
    """MuonMax-Momo (`observe_losses`, `momo_step`) and AdamW (`_adam_direction`), read and written by
    `ServerState.step_sizes` / `step` (which own `momo`, `adam`, `_momo_xg`, `cfg`, `specs`, `X`, `W`, `G`)."""

    # ------------------------------------------------------------------ Momo (muonmax-momo)
    @staticmethod
    def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
        """sum_i <a_i, b_i> over the layers, each in float64, added in layer order."""
        total = 0.0
        for x, y in zip(a, b):
            if x.numel():
                total += float(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()))
        return total

    def _spectral_mult(self) -> float:
        """The reference's muon_lr_scale: the lr multiplier of the (first) spectral layer, 1 without one."""
        for s in self.specs:
            if s.norm == "spectral":
                return float(self.cfg.lr_mult.get(s.norm, s.lr_mult))
        return 1.0

    def observe_losses(self, losses: Mapping[int, float], init: bool = False) -> None:
        """muonmax-momo: update the loss model with round k's losses, right after its uplinks are applied.

        f = the mean of the finite `losses` ({client: train loss at W_k}, added in client-id order); with
        G_k = (1 - beta) G_{k-1} + beta g_k defining the gradient g_k that G absorbed this round,
            loss_model <- (1 - beta) loss_model + beta (f - <W_k, g_k>)
                        = (1 - beta) (loss_model + <W_k, G_{k-1}>) + beta f - <W_k, G_k>
        (the notes' EMA of f - <x, g>, with the momentum's beta, linearised at W where the losses and
        gradients are taken). `init` (the 'grad' initialisation, G_0 = g_0): loss_model = f_0 - <W_0, G_0>.
        A round without a finite loss leaves the model as it is. No-op for every other preset."""
        if self.momo is None:
            return
        vals = [float(losses[j]) for j in sorted(losses) if math.isfinite(float(losses[j]))]
        if not vals:
            return
        f = sum(vals) / len(vals)
        wg = self._dot(self.W, self.G)
        prev = self.momo["wg"]
        if init or prev is None:
            self.momo["loss_model"] = f - wg
        else:
            beta = float(self.cfg.beta)
            self.momo["loss_model"] = (1.0 - beta) * (self.momo["loss_model"] + prev) + beta * f - wg

    def momo_step(self, t: float, scale: float) -> float:
        """The Momo-truncated step of this round (notes §5, GPT-opt's MuonMaxMomo):

            t_k = min(t, (loss_model - F* + <X, G>)_+ / dual^2),   dual^2 = muon_lr_scale * scale^2

        with `scale` the (stale) sum of nuclear norms that MuonMax steps by, muon_lr_scale the spectral
        layers' lr multiplier, and <X, G> taken before the step moves X. A zero dual (G == 0) keeps t."""
        dual2 = self._spectral_mult() * scale * scale
        gap = max(self.momo["loss_model"] - float(self.cfg.f_star) + self._momo_xg, 0.0)
        out = min(t, gap / dual2) if dual2 > 0 else t
        self.momo["t"] = out
        return out

    def _adam_direction(self, i: int, k: int, g: torch.Tensor) -> torch.Tensor:
        """Preset 'adamw', layer i of step k: m <- b1 m + (1-b1) G, v <- b2 v + (1-b2) G^2; returns
        -(m / (1-b1^k)) / (sqrt(v / (1-b2^k)) + eps), torch.optim.AdamW's update direction (so
        X <- X(1 - t wd) + t * it). lr_mult does not apply: every layer steps t."""
        b1, b2, eps = self.cfg.adam_beta1, self.cfg.adam_beta2, self.cfg.adam_eps
        m, v = self.adam[0][i], self.adam[1][i]
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = (v.sqrt() / math.sqrt(1.0 - b2 ** k)).add_(eps)
        return (m / denom).mul_(-1.0 / (1.0 - b1 ** k))

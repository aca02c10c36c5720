"""The ``lsq`` task: distributed least squares with a known optimum (f_star exact in float64)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import Task, _build_off_rng, _generator, _on_model_device
from .options import _bool_opt, _float_opt, _int_opt


class LsqTask(Task):
    """Distributed least squares with a known optimum.

    f_j(X, b) = 1/(2m) ||A_j X^T + 1 b^T - B_j||_F^2 ,  f = (1/n) sum_j f_j,
    with A_j ~ N(0, 1) (m x d_in), B_j = A_j X_j^T (+ b_true) + noise * N(0, 1), and
    X_j = X_true + heterogeneity * N(0, 1/d_in) (so the local optima differ). The model is an
    ``nn.Linear(d_in, d_out, bias=options["bias"])``. The data the workers see is float32;
    ``f_star`` is the exact minimum of f on that float32 data, computed in float64 by lstsq.
    Each worker's batch is its whole shard (full-batch, deterministic gradients).
    """

    name = "lsq"
    OPTIONS = {
        "d_in": (32, _int_opt(1)),
        "d_out": (16, _int_opt(1)),
        "rows": (256, _int_opt(1)),
        "noise": (0.1, _float_opt(0.0)),
        "heterogeneity": (0.5, _float_opt(0.0)),
        "bias": (False, _bool_opt),
    }
    # Reference (identity compressors, 4 workers, seed 0): f - f* falls by ~1e8 in 300 rounds
    # (SVD or Newton-Schulz polar); EF21 with topk:0.1 both ways still gets ~2e4. Larger lr
    # loses accuracy under compression, lr <= 0.01 cannot travel to the optimum in 300 rounds.
    defaults = {"lr": 0.03, "beta": 0.1, "rounds": 300, "schedule": "cosine", "warmup": 0,
                "preset": "muon", "lr_mult": {"sign": 1.0, "bias_rms": 1.0}}

    def __init__(self, n_workers: int, seed: int, options: dict):
        super().__init__(n_workers, seed, options)
        d_in, d_out, m = options["d_in"], options["d_out"], options["rows"]
        if n_workers * m < d_in + int(options["bias"]):
            raise ConfigError(f"lsq needs n_workers*rows >= d_in (+1 with bias) for a unique "
                              f"optimum; got {n_workers}*{m} < {d_in}")
        g = _generator("lsq", seed, n_workers, "data")
        f64 = torch.float64
        x_true = torch.randn(d_out, d_in, generator=g, dtype=f64) / math.sqrt(d_in)
        b_true = torch.randn(d_out, generator=g, dtype=f64) if options["bias"] else None
        a_list, b_list = [], []
        for _ in range(n_workers):
            a = torch.randn(m, d_in, generator=g, dtype=f64)
            x_j = x_true + options["heterogeneity"] * torch.randn(d_out, d_in, generator=g,
                                                                  dtype=f64) / math.sqrt(d_in)
            y = a @ x_j.T + options["noise"] * torch.randn(m, d_out, generator=g, dtype=f64)
            if b_true is not None:
                y = y + b_true
            a_list.append(a.float())
            b_list.append(y.float())
        self.A = torch.stack(a_list)  # (n, m, d_in) float32: what the workers see
        self.B = torch.stack(b_list)  # (n, m, d_out)
        # Exact problem in float64 on the float32 data. All shards have m rows, so
        # f = 1/(2 n m) ||A_all W^T - B_all||^2.
        self._A64 = self.A.reshape(-1, d_in).double()
        self._B64 = self.B.reshape(-1, d_out).double()
        design = self._A64
        if options["bias"]:
            design = torch.cat([design, torch.ones(design.shape[0], 1, dtype=f64)], dim=1)
        sol = torch.linalg.lstsq(design, self._B64, driver="gelsd").solution  # (d_in[+1], d_out)
        self.optimum: dict[str, torch.Tensor] = {"weight": sol[:d_in].T.contiguous()}
        if options["bias"]:
            self.optimum["bias"] = sol[d_in].contiguous()
        self.f_star = self._f64(self.optimum["weight"], self.optimum.get("bias"))
        self.embedding_names = frozenset()
        self.head_names = frozenset()

    def _f64(self, w: torch.Tensor, b: torch.Tensor | None) -> float:
        r = self._A64 @ w.detach().to("cpu", torch.float64).T - self._B64
        if b is not None:
            r = r + b.detach().to("cpu", torch.float64)
        return float(0.5 * (r * r).sum() / r.shape[0])

    def build_model(self) -> nn.Module:
        d_in, d_out = self.options["d_in"], self.options["d_out"]
        model = _build_off_rng(lambda: nn.Linear(d_in, d_out, bias=self.options["bias"]))
        g = _generator("lsq", self.seed, self.n_workers, "init")
        bound = 1.0 / math.sqrt(d_in)
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.uniform_(-bound, bound, generator=g)
        return model

    def batch(self, worker: int, round: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(worker, round)
        return self.A[worker].clone(), self.B[worker].clone()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        a, b = _on_model_device(model, *batch)
        r = model(a) - b
        return 0.5 * (r * r).sum() / a.shape[0]

    @torch.no_grad()
    def train_eval_loss(self, model: nn.Module) -> float:
        """The exact objective f (float64 arithmetic on the model's float32 values)."""
        return self._f64(model.weight, getattr(model, "bias", None))

    def eval_loss(self, model: nn.Module) -> float:
        return self.train_eval_loss(model)

    @torch.no_grad()
    def suboptimality(self, model: nn.Module) -> float:
        """f(model) - f_star computed without cancellation: 1/(2N) ||A_all (W - W*)^T + ...||^2."""
        r = self._A64 @ (model.weight.detach().to("cpu", torch.float64) - self.optimum["weight"]).T
        if "bias" in self.optimum:
            r = r + (model.bias.detach().to("cpu", torch.float64) - self.optimum["bias"])
        return float(0.5 * (r * r).sum() / r.shape[0])


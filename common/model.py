"""The torch side of a run that the simulator, the server and the worker share: `Setup` (the task,
its model, parameter names, initial parameters and layer specs, all derived from the config),
copying parameters into a model, and the loss and gradients of a model at given parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import RunConfig, resolve
from .lmo import LayerSpec, assign_norms
from .usermodel import make_run_task


def model_specs(model: torch.nn.Module, cfg: RunConfig, embedding_names=(), head_names=(),
                stacked_names=()) -> list[LayerSpec]:
    """Layer norms for every parameter of `model`, from the preset and the config's overrides (a config
    whose preset is unset takes the generic default, as `resolve` fills it)."""
    if cfg.preset is None:
        cfg = resolve(cfg, {})

    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    emb = set(embedding_names) | {
        f"{mn}.weight" if mn else "weight"
        for mn, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding)
    }
    return assign_norms(names, preset=cfg.preset, overrides=cfg.norms or None,
                        embedding_names=emb, head_names=set(head_names), stacked_names=set(stacked_names))


def parameters_of(model: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    names, params = zip(*[(n, p.detach().clone()) for n, p in model.named_parameters()])
    return list(names), list(params)


def load_parameters(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> None:
    """Copy `params` into the model's parameters; a parameter that already is a view of the same
    storage (the networked worker binds its model to W: `Worker._bind_model`) is left alone."""
    with torch.no_grad():
        for p, w in zip(model.parameters(), params):
            if p.data_ptr() == w.data_ptr() and p.shape == w.shape and p.dtype == w.dtype \
                    and p.stride() == w.stride() and p.device == w.device:
                continue
            p.copy_(w)


def gradients(model: torch.nn.Module, params: Sequence[torch.Tensor], loss_fn) -> tuple[float, list[torch.Tensor]]:
    """Load `params` into `model`, evaluate `loss_fn(model)` and return (loss, gradients at params)."""
    load_parameters(model, params)
    model.zero_grad(set_to_none=True)
    model.train()
    loss = loss_fn(model)
    loss.backward()
    # Hand the gradient tensors over instead of cloning them (one model copy less per worker):
    # the parameters drop their reference, so the next backward allocates fresh ones.
    grads = []
    for p in model.parameters():
        grads.append(p.grad.detach() if p.grad is not None else torch.zeros_like(p))
        p.grad = None
    return float(loss.detach()), grads


def evaluate(model: torch.nn.Module, params: Sequence[torch.Tensor], fn) -> float:
    load_parameters(model, params)
    model.eval()
    with torch.no_grad():
        return float(fn(model))


class Setup:
    """Everything both sides derive from the config: the task, model, names, initial params, layer specs."""

    def __init__(self, cfg: RunConfig, task=None):
        self.task = task if task is not None else make_run_task(cfg)
        self.cfg = resolve(cfg, getattr(self.task, "defaults", {}) or {})
        self.model = self.task.build_model()
        self.names, self.params = parameters_of(self.model)
        self.specs = model_specs(self.model, self.cfg, getattr(self.task, "embedding_names", ()),
                                 getattr(self.task, "head_names", ()), getattr(self.task, "stacked_names", ()))
        self.numel = sum(p.numel() for p in self.params)

    def uncompressed_round_bytes(self) -> int:
        """What one identity fp32 message of the whole model costs."""
        return 4 * self.numel


def eval_losses(setup: Setup, model, W, X) -> tuple[float, float]:
    t = setup.task
    return evaluate(model, W, t.train_eval_loss), evaluate(model, X, t.train_eval_loss)

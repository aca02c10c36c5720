"""What every task shares: stable seeds (`derive_seed`, local torch generators), the `Task`
interface, and building a module without touching the global RNG."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..seeds import derive_seed  # noqa: F401 - tasks' seeds are derived here
import torch.nn as nn

from ..errors import ConfigError



def _generator(*parts: Any) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g


class Task:
    """Common interface; see the package docstring. Subclasses fill the attributes below."""

    name: str = ""
    n_workers: int
    seed: int
    options: dict
    f_star: float | None = None
    defaults: dict = {}
    embedding_names: frozenset[str] = frozenset()
    head_names: frozenset[str] = frozenset()
    stacked_names: frozenset[str] = frozenset()  # (E, rows, cols) parameters: one matrix per expert

    def __init__(self, n_workers: int, seed: int, options: dict):
        self.n_workers = n_workers
        self.seed = seed
        self.options = options
        self.defaults = _copy_defaults(type(self).defaults)

    # -- interface
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def batch(self, worker: int, round: int) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def train_eval_loss(self, model: nn.Module) -> float:
        raise NotImplementedError

    def eval_loss(self, model: nn.Module) -> float:
        raise NotImplementedError

    # -- helpers
    def describe(self) -> dict:
        """JSON-able identity of the task (for reports and for checking two processes agree)."""
        return {"name": self.name, "n_workers": self.n_workers, "seed": self.seed,
                "options": dict(self.options)}

    def _check(self, worker: int, round: int) -> None:
        if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)) \
                or not 0 <= worker < self.n_workers:
            raise ConfigError(f"worker={worker!r} must be an integer in [0, {self.n_workers})")
        if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 0:
            raise ConfigError(f"round={round!r} must be a non-negative integer")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_workers={self.n_workers}, seed={self.seed}, " \
               f"options={self.options})"


def _copy_defaults(d: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}


def _build_off_rng(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without touching the global RNG: its default initialisation runs under a
    forked CPU RNG, whose state is put back afterwards (the task then initialises every parameter
    itself, from its own seeded generator). Not the meta device and `Module.to_empty`: initialising
    meta tensors goes through torch's Python reference kernels, whose first use imports torch._dynamo
    and sympy, more than a second of every worker's start-up; the default initialisation of the
    largest built-in model takes milliseconds."""
    with torch.random.fork_rng(devices=[]):
        return factory()



def _on_model_device(model: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` moved to the device of `model`'s parameters (the tasks' data live on the CPU; a
    worker or simulator on --device cuda holds the model there). A no-op on the CPU."""
    p = next(model.parameters(), None)
    if p is None or p.device.type == "cpu":
        return tensors
    return tuple(t.to(p.device, non_blocking=True) for t in tensors)

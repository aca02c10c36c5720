"""A user's own model from the command line: `--model package.module:factory` (config key `model`).

The factory is a function in the user's module. efmuon calls it with the keyword arguments it names
among `seed` (the run's seed), `workers` (n: the clients whose batches it must provide), `options` (the
`--task-option KEY=VALUE` table) and `config` (the whole RunConfig), and it returns a `UserModel`:

    UserModel(model=nn.Module, loss=loss(model, batch) -> scalar tensor, batch=batch(j, k) -> client
              j's batch of round k, eval_loss=model -> float | None, train_eval_loss=model -> float | None,
              defaults={"lr": .., "rounds": ..} | None, head_names=(..), embedding_names=(..))

`UserTask` wraps it in the `Task` interface (common/tasks/base.py), so every driver (simulate, the
server, the workers) treats it like a built-in task. The factory runs under `torch.manual_seed` (and
numpy's global seed) derived from the run seed, with the global RNG states put back afterwards, so the
server, every worker and `efmuon simulate` build the same initial parameters, bit for bit.
`make_run_task(cfg, n)` is the one place a run's task is made: the user's model, or a built-in by name.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .config import check_model_spec
from .errors import ConfigError
from .seeds import derive_seed
from .tasks import Task, make_task

FACTORY_ARGS = ("seed", "workers", "options", "config")
DEFAULT_KEYS = ("rounds", "preset", "lr", "beta", "schedule", "warmup", "eval_every", "lr_mult")
TRAIN_EVAL_CLIENTS = 8  # the default train_eval_loss: the mean loss over the round-0 batches of this many clients


@dataclass
class UserModel:
    """What a `--model` factory returns (module docstring). Only `model`, `loss` and `batch` are required.

    `batch(j, k)` must depend on (j, k) only (seed any randomness from them): the server never calls it,
    each worker calls it for its own j, and `efmuon simulate` for every j, and all must see the same data.
    `train_eval_loss(model)`: the training objective, reported as loss_w / loss_x (default: the mean of
    `loss` over the round-0 batches of clients 0..min(n, 8)-1); `eval_loss(model)`: the validation loss
    (eval_loss_w, val_loss_w; default: train_eval_loss). `defaults`: recommended settings for fields the
    config leaves unset (rounds, preset, lr, beta, schedule, warmup, eval_every, lr_mult). `head_names` /
    `embedding_names`: parameter names that take the sign norm (docs/design.md §3) besides those found by
    name and `nn.Embedding`."""

    model: nn.Module
    loss: Callable[[nn.Module, Any], torch.Tensor]
    batch: Callable[[int, int], Any]
    eval_loss: Callable[[nn.Module], float] | None = None
    train_eval_loss: Callable[[nn.Module], float] | None = None
    defaults: dict | None = None
    head_names: tuple = ()
    embedding_names: tuple = ()
    extra: dict = field(default_factory=dict)  # anything the user wants to keep with it; efmuon ignores it


def load_factory(spec: str) -> Callable:
    """Import the factory of `spec`. The current directory is tried as well (as `python -m` would), so a
    module next to where `efmuon` runs is found; anything else must be on sys.path (PYTHONPATH)."""
    module, attr = check_model_spec(spec)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    importlib.invalidate_caches()  # a module written since this process last looked (tests, notebooks)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name) and module.split(".")[: len(exc.name.split("."))] == \
                exc.name.split("."):
            raise ConfigError(
                f"model {spec!r}: module {module!r} cannot be imported in this process ({exc}); it must be "
                f"importable on the server and on every worker: install it, run from the folder that holds it, "
                f"or add that folder to PYTHONPATH (sys.path here: {sys.path})") from None
        raise ConfigError(f"model {spec!r}: importing module {module!r} failed: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"model {spec!r}: importing module {module!r} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = mod
    for name in attr.split("."):
        if not hasattr(obj, name):
            found = sorted(n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n, None)))
            raise ConfigError(f"model {spec!r}: module {module!r} ({getattr(mod, '__file__', '?')}) has no "
                              f"{attr!r}; its functions and classes: {', '.join(found) or 'none'}")
        obj = getattr(obj, name)
    if not callable(obj):
        raise ConfigError(f"model {spec!r}: {attr!r} is a {type(obj).__name__}, not a function that returns "
                          f"efmuon.common.usermodel.UserModel")
    return obj


def _factory_kwargs(spec: str, factory: Callable, available: dict) -> dict:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(available)
    out = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL,):
            continue
        if p.name in available and p.kind is not p.POSITIONAL_ONLY:
            out[p.name] = available[p.name]
        elif p.default is p.empty:
            raise ConfigError(f"model {spec!r}: the factory's argument {p.name!r} is not one efmuon gives; it may "
                              f"take any of {', '.join(FACTORY_ARGS)} (by name), or give {p.name!r} a default")
    if available["options"] and "options" not in out:
        raise ConfigError(f"model {spec!r}: task options {sorted(available['options'])} were given but the factory "
                          f"takes no 'options' argument; add one, or drop the --task-option flags")
    return out


def call_factory(spec: str, seed: int, workers: int, options: dict, config=None) -> UserModel:
    """Import and call the factory under a seeded RNG (put back afterwards); check what it returned."""
    factory = load_factory(spec)
    kwargs = _factory_kwargs(spec, factory, {"seed": seed, "workers": workers, "options": dict(options),
                                             "config": config})
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed("user-model", spec, seed))
            np.random.seed(derive_seed("user-model", spec, seed, "numpy") % 2**32)
            out = factory(**kwargs)
    finally:
        np.random.set_state(np_state)
    return check_user_model(spec, out)


def check_user_model(spec: str, out: Any) -> UserModel:
    """`out` is a UserModel with a float32 nn.Module, callables and sane defaults, or ConfigError naming what is not."""
    where = f"model {spec!r}: the factory"
    if not isinstance(out, UserModel):
        raise ConfigError(f"{where} returned {type(out).__name__}; return efmuon.common.usermodel.UserModel(model=..., "
                          f"loss=..., batch=...)")
    if not isinstance(out.model, nn.Module):
        raise ConfigError(f"{where}'s UserModel.model is a {type(out.model).__name__}, not a torch.nn.Module")
    named = list(out.model.named_parameters())
    if not named:
        raise ConfigError(f"{where}'s model has no parameters: there is nothing to train")
    bad = [f"{n} ({p.dtype})" for n, p in named if p.dtype != torch.float32]
    if bad:
        raise ConfigError(f"{where}'s model has parameters that are not float32: {', '.join(bad[:5])}; the wire carries "
                          f"float32: call model.float()")
    for name in ("loss", "batch"):
        if not callable(getattr(out, name)):
            raise ConfigError(f"{where}'s UserModel.{name} is {getattr(out, name)!r}, not a function")
    for name in ("eval_loss", "train_eval_loss"):
        v = getattr(out, name)
        if v is not None and not callable(v):
            raise ConfigError(f"{where}'s UserModel.{name} is {v!r}, not a function of the model (or None)")
    if out.defaults is not None:
        if not isinstance(out.defaults, dict):
            raise ConfigError(f"{where}'s UserModel.defaults is a {type(out.defaults).__name__}, not a dict")
        unknown = sorted(set(out.defaults) - set(DEFAULT_KEYS))
        if unknown:
            raise ConfigError(f"{where}'s UserModel.defaults has unknown key(s) {unknown}; valid: {list(DEFAULT_KEYS)}")
    names = {n for n, _ in named}
    for attr in ("head_names", "embedding_names"):
        missing = sorted(set(getattr(out, attr) or ()) - names)
        if missing:
            raise ConfigError(f"{where}'s UserModel.{attr} names {missing}, which are not parameters of the model; "
                              f"its parameters: {sorted(names)[:20]}")
    return out


def _same(a, b) -> bool:
    """Whether two batches hold the same data (tensors, arrays, numbers, nested tuples / lists / dicts)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float, str, bool)) or a is None:
        return a == b
    return True  # an object we cannot compare: trust it


class UserTask(Task):
    """A user's `UserModel` behind the `Task` interface. `build_model()` returns a fresh copy of the
    factory's model with its initial parameters (the factory runs once)."""

    OPTIONS: dict = {}

    def __init__(self, spec: str, n_workers: int, seed: int, options: dict, config=None):
        super().__init__(n_workers, seed, dict(options))
        self.spec = spec
        self.name = spec
        self.user = user = call_factory(spec, seed, n_workers, options, config)
        self._template = copy.deepcopy(user.model).cpu()
        self.defaults = dict(user.defaults or {})
        self.head_names = frozenset(user.head_names or ())
        self.embedding_names = frozenset(user.embedding_names or ())
        self._loss_checked = False
        self._check_batches()

    def _check_batches(self) -> None:
        try:
            a, b = self.user.batch(0, 0), self.user.batch(0, 0)
        except Exception as exc:
            raise ConfigError(f"model {self.spec!r}: batch(0, 0) failed: {type(exc).__name__}: {exc}") from exc
        if not _same(a, b):
            raise ConfigError(f"model {self.spec!r}: batch(0, 0) returned different data on two calls; batch(j, k) "
                              f"must depend on (j, k) only (the server, each worker and simulate must agree): draw "
                              f"with a torch.Generator seeded from (seed, j, k), not the global RNG")

    def build_model(self) -> nn.Module:
        return copy.deepcopy(self._template)

    def batch(self, worker: int, round: int) -> Any:
        self._check(worker, round)
        return self.user.batch(int(worker), int(round))

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        out = self.user.loss(model, batch)
        if not isinstance(out, torch.Tensor) or out.numel() != 1 or not out.dtype.is_floating_point:
            what = f" {tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else ""
            raise ConfigError(f"model {self.spec!r}: loss(model, batch) returned {type(out).__name__}{what}; it must "
                              f"return a scalar floating-point tensor (e.g. F.cross_entropy(...))")
        if not self._loss_checked and torch.is_grad_enabled():
            if not out.requires_grad:
                raise ConfigError(f"model {self.spec!r}: loss(model, batch) does not depend on the model's parameters "
                                  f"(no gradient); compute it from model(...)")
            self._loss_checked = True
        return out

    def train_eval_loss(self, model: nn.Module) -> float:
        fn = self.user.train_eval_loss or self.user.eval_loss
        if fn is not None:
            return self._number("train_eval_loss" if self.user.train_eval_loss else "eval_loss", fn(model))
        m = min(self.n_workers, TRAIN_EVAL_CLIENTS)
        with torch.no_grad():
            return sum(float(self.loss(model, self.user.batch(j, 0))) for j in range(m)) / m

    def eval_loss(self, model: nn.Module) -> float:
        if self.user.eval_loss is None:
            return self.train_eval_loss(model)
        return self._number("eval_loss", self.user.eval_loss(model))

    def _number(self, name: str, v) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"model {self.spec!r}: {name}(model) returned {v!r}, not a number") from None

    def describe(self) -> dict:
        return {**super().describe(), "model": self.spec}


def make_run_task(cfg, n_workers: int | None = None) -> Task:
    """The run's task: the user's model (`cfg.model`) or the built-in `cfg.task`, cut for n_workers
    (default cfg.workers)."""
    n = cfg.workers if n_workers is None else n_workers
    if getattr(cfg, "model", None):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n_workers={n!r} must be a positive integer")
        return UserTask(cfg.model, int(n), int(cfg.seed), dict(cfg.task_options or {}), config=cfg)
    return make_task(cfg.task, n, seed=cfg.seed, **cfg.task_options)

"""The ``digits`` task: an MLP on scikit-learn's bundled 8x8 digits, IID or Dirichlet shards."""
from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Task, _build_off_rng, _generator, _on_model_device, derive_seed
from .options import _float_opt, _int_opt


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU; the output layer is ``head``."""

    def __init__(self, d_in: int = 64, hidden: int = 128, n_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (data (1797, 64), target (1797,)), exactly `load_digits()`'s.

    Read straight from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`, the same
    `np.loadtxt(delimiter=",")` that `load_digits` runs), found without importing scikit-learn: its import
    costs about a second of CPU in every worker process, the file 20 ms. If the file is not where this
    version keeps it, `load_digits()` itself."""
    spec = importlib.util.find_spec("sklearn")
    path = (os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
            if spec is not None and spec.origin else None)
    if path is not None and os.path.isfile(path):
        with gzip.open(path, "rt") as fh:
            data = np.loadtxt(fh, delimiter=",")
        if data.shape == (1797, 65):
            return data[:, :-1], data[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits  # scikit-learn, for this task only (no download)
    d = load_digits()
    return d.data, d.target


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    data, target = _digits_arrays()
    x = torch.tensor(np.asarray(data, dtype=np.float32) / 16.0)  # pixel values 0..16 -> [0, 1]
    y = torch.tensor(np.asarray(target, dtype=np.int64))
    return x, y


class DigitsTask(Task):
    """MLP on scikit-learn's bundled 8x8 digits (1797 images), cross-entropy.

    A fixed permutation splits 80/20 into train/validation. The training set is partitioned
    into ``n_workers`` shards: IID (a random permutation cut into near-equal pieces) or, with
    ``dirichlet=alpha``, per class c proportions p_c ~ Dirichlet(alpha) over workers (small alpha:
    skewed label histograms). A batch is ``batch_size`` distinct samples of the worker's shard
    (with replacement only if the shard is smaller than the batch).
    """

    name = "digits"
    MIN_SHARD = 8
    OPTIONS = {
        "hidden": (128, _int_opt(1)),
        "batch_size": (64, _int_opt(1)),
        "dirichlet": (None, _float_opt(0.0, strict=True, allow_none=True)),
        "val_fraction": (0.2, _float_opt(0.0, strict=True, maximum=1.0)),
    }
    # Reference (4 workers, seed 0): val accuracy 0.98 after 50 rounds, 0.99 / val loss ~0.02
    # after 200 (IID or dirichlet=0.3); EF21 with topk:0.1 both ways: 0.99.
    defaults = {"lr": 0.05, "beta": 0.1, "rounds": 200, "schedule": "cosine", "warmup": 0,
                "preset": "muon", "lr_mult": {"sign": 8.0, "bias_rms": 0.1}}

    def __init__(self, n_workers: int, seed: int, options: dict):
        super().__init__(n_workers, seed, options)
        x, y = _load_digits()
        n = x.shape[0]
        perm = torch.randperm(n, generator=_generator("digits", seed, "split"))
        n_val = int(round(options["val_fraction"] * n))
        if n_val < 1 or n - n_val < n_workers * self.MIN_SHARD:
            raise ConfigError(f"digits: val_fraction={options['val_fraction']} and "
                              f"n_workers={n_workers} leave too little data for every worker")
        self.val_idx = perm[:n_val].clone()
        self.train_idx = perm[n_val:].clone()
        self.x_train, self.y_train = x[self.train_idx], y[self.train_idx]
        self.x_val, self.y_val = x[self.val_idx], y[self.val_idx]
        self.shards = self._make_shards()  # positions into the training set, one tensor per worker
        # Per-sample weights that turn one pass over the training set into (1/n) sum_j f_j.
        w = torch.empty(self.x_train.shape[0], dtype=torch.float64)
        for s in self.shards:
            w[s] = 1.0 / (n_workers * len(s))
        self._train_weights = w
        self.embedding_names = frozenset()
        self.head_names = frozenset({"head.weight"})

    def _make_shards(self) -> list[torch.Tensor]:
        n, n_train = self.n_workers, self.x_train.shape[0]
        alpha = self.options["dirichlet"]
        if alpha is None:
            perm = torch.randperm(n_train, generator=_generator("digits", self.seed, n, "iid"))
            return [p.sort().values.clone() for p in torch.tensor_split(perm, n)]
        rng = np.random.default_rng(derive_seed("digits", self.seed, n, "dirichlet", alpha))
        labels = self.y_train.numpy()
        for _ in range(1000):
            parts: list[list[np.ndarray]] = [[] for _ in range(n)]
            for c in range(10):
                idx = np.flatnonzero(labels == c)
                p = rng.dirichlet(np.full(n, alpha))
                cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
                for j, piece in enumerate(np.split(idx, cuts)):
                    parts[j].append(piece)
            shards = [np.sort(np.concatenate(p)) for p in parts]
            if min(len(s) for s in shards) >= self.MIN_SHARD:
                return [torch.from_numpy(s.astype(np.int64)) for s in shards]
        raise ConfigError(f"digits: dirichlet={alpha} with n_workers={n} keeps leaving a worker "
                          f"with fewer than {self.MIN_SHARD} samples; use a larger alpha")

    def build_model(self) -> nn.Module:
        model = _build_off_rng(lambda: DigitsMLP(64, self.options["hidden"], 10))
        g = _generator("digits", self.seed, "init")
        with torch.no_grad():
            for name, p in model.named_parameters():  # nn.Linear's default ranges, local RNG
                fan_in = model.get_submodule(name.rsplit(".", 1)[0]).in_features
                bound = 1.0 / math.sqrt(fan_in)
                p.uniform_(-bound, bound, generator=g)
        return model

    def batch(self, worker: int, round: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(worker, round)
        shard = self.shards[worker]
        bs = self.options["batch_size"]
        g = _generator("digits", self.seed, self.n_workers, "batch", int(worker), int(round))
        if len(shard) >= bs:
            pos = torch.randperm(len(shard), generator=g)[:bs]
        else:
            pos = torch.randint(0, len(shard), (bs,), generator=g)
        idx = shard[pos]
        return self.x_train[idx], self.y_train[idx]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = _on_model_device(model, *batch)
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def train_eval_loss(self, model: nn.Module) -> float:
        """Exact f = (1/n) sum_j (mean loss over shard j), one pass over the training set."""
        x, y = _on_model_device(model, self.x_train, self.y_train)
        per = F.cross_entropy(model(x), y, reduction="none")
        return float((per.double().cpu() * self._train_weights).sum())

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        return float(F.cross_entropy(*self._logits_targets(model, self.x_val, self.y_val)))

    def _logits_targets(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        x, y = _on_model_device(model, x, y)
        return model(x), y

    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: str = "val") -> float:
        if split not in ("val", "train"):
            raise ConfigError(f"split={split!r}; valid: ['train', 'val']")
        x, y = (self.x_val, self.y_val) if split == "val" else (self.x_train, self.y_train)
        logits, y = self._logits_targets(model, x, y)
        return float((logits.argmax(dim=1) == y).double().mean())


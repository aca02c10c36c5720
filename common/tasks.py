"""Built-in training tasks that need no download: ``lsq``, ``digits`` and ``gpt-char``.

A task owns the data, the split into ``n_workers`` shards (worker j's local objective f_j), the
model and the losses. Everything is a pure function of ``(name, n_workers, seed, options)``:

* the data, the shards and the initial weights are identical in every process;
* ``batch(worker, round)`` is identical in every process and for every call order — its random
  stream is a ``torch.Generator`` seeded by a SHA-256 hash of ``(task, seed, worker, round)``;
* no function here reads or advances the global torch / numpy / ``random`` RNG state
  (models are built on the ``meta`` device and initialised from a local generator).

The training objective is f = (1/n) sum_j f_j. ``train_eval_loss`` evaluates it (exactly for
``lsq`` and ``digits``; on a fixed set of training windows, equally many per worker, for
``gpt-char``). ``eval_loss`` is a held-out loss (``lsq`` has no held-out data: it is f again).

``Task.defaults`` are the recommended run settings, tuned with a reference implementation of the
Muon-preset LMO step (see tests/test_tasks.py). Schedule convention used in that tuning, for round
k = 0 .. rounds-1::

    k <  warmup:  lr_k = lr * (k + 1) / warmup
    k >= warmup:  p = (k - warmup) / (rounds - warmup)
                  constant: lr;  linear: lr * (1 - p);  cosine: lr * (1 + cos(pi p)) / 2
"""
from __future__ import annotations

import collections
import functools
import hashlib
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .gptchar import GPT

__all__ = ["TASKS", "Task", "LsqTask", "DigitsTask", "GptCharTask", "make_task", "derive_seed",
           "load_corpus"]

TASKS = ("lsq", "digits", "gpt-char")


# --------------------------------------------------------------------------- seeds and options

def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (ints, strings). Stable across processes, unlike ``hash()``."""
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: Any) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g


def _int_opt(minimum: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"task option {key}={value!r} must be an integer >= {minimum}")
        if value < minimum:
            raise ConfigError(f"task option {key}={value!r} must be an integer >= {minimum}")
        return int(value)
    return check


def _float_opt(minimum: float, *, strict: bool = False, maximum: float | None = None,
               allow_none: bool = False) -> Callable[[str, Any], float | None]:
    def check(key: str, value: Any) -> float | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ConfigError(f"task option {key}={value!r} must be a number")
        value = float(value)
        bad = (not math.isfinite(value) or value < minimum or (strict and value == minimum)
               or (maximum is not None and value >= maximum))
        if bad:
            rng = f"{'>' if strict else '>='} {minimum}" + (f" and < {maximum}" if maximum else "")
            raise ConfigError(f"task option {key}={value!r} must be a finite number {rng}")
        return value
    return check


def _bool_opt(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"task option {key}={value!r} must be true or false")
    return value


def _resolve_options(task: str, spec: dict[str, tuple[Any, Callable]], given: dict) -> dict:
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for task {task!r}; "
                          f"valid options: {sorted(spec)}")
    out = {}
    for key, (default, check) in spec.items():
        out[key] = check(key, given[key]) if key in given else default
    return out


# --------------------------------------------------------------------------- base class

class Task:
    """Common interface; see the module docstring. Subclasses fill the attributes below."""

    name: str = ""
    n_workers: int
    seed: int
    options: dict
    f_star: float | None = None
    defaults: dict = {}
    embedding_names: frozenset[str] = frozenset()
    head_names: frozenset[str] = frozenset()

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


def _build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without running its default (global-RNG) initialisation."""
    with torch.device("meta"):
        module = factory()
    return module.to_empty(device="cpu")


# --------------------------------------------------------------------------- lsq

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
        r = self._A64 @ w.double().T - self._B64
        if b is not None:
            r = r + b.double()
        return float(0.5 * (r * r).sum() / r.shape[0])

    def build_model(self) -> nn.Module:
        d_in, d_out = self.options["d_in"], self.options["d_out"]
        model = _build_on_meta(lambda: nn.Linear(d_in, d_out, bias=self.options["bias"]))
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
        a, b = batch
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
        r = self._A64 @ (model.weight.double() - self.optimum["weight"]).T
        if "bias" in self.optimum:
            r = r + (model.bias.double() - self.optimum["bias"])
        return float(0.5 * (r * r).sum() / r.shape[0])


# --------------------------------------------------------------------------- digits

class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU; the output layer is ``head``."""

    def __init__(self, d_in: int = 64, hidden: int = 128, n_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    d = load_digits()
    x = torch.tensor(np.asarray(d.data, dtype=np.float32) / 16.0)  # pixel values 0..16 -> [0, 1]
    y = torch.tensor(np.asarray(d.target, dtype=np.int64))
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
        model = _build_on_meta(lambda: DigitsMLP(64, self.options["hidden"], 10))
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
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def train_eval_loss(self, model: nn.Module) -> float:
        """Exact f = (1/n) sum_j (mean loss over shard j), one pass over the training set."""
        per = F.cross_entropy(model(self.x_train), self.y_train, reduction="none")
        return float((per.double() * self._train_weights).sum())

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        return float(F.cross_entropy(model(self.x_val), self.y_val))

    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: str = "val") -> float:
        if split not in ("val", "train"):
            raise ConfigError(f"split={split!r}; valid: ['train', 'val']")
        x, y = (self.x_val, self.y_val) if split == "val" else (self.x_train, self.y_train)
        return float((model(x).argmax(dim=1) == y).double().mean())


# --------------------------------------------------------------------------- gpt-char

@functools.lru_cache(maxsize=1)
def load_corpus() -> str:
    """The English prose of Python's own ``pydoc_data.topics`` (sorted keys, concatenated).

    Ships with CPython, so nothing is downloaded; its content depends on the Python version
    (``GptCharTask.corpus_sha256`` identifies it so that processes can check they agree).
    """
    from pydoc_data.topics import topics
    return "".join(topics[k] for k in sorted(topics))


class GptCharTask(Task):
    """Character-level GPT on the pydoc topics corpus.

    Vocabulary: the sorted set of characters occurring at least ``min_count`` times, plus
    ``'?'``, which also stands for every rarer character. First 90% of the text (by position) is
    training text, the rest validation. Worker j owns the j-th contiguous slice of the training
    text; a batch is ``batch_size`` random windows of ``context`` + 1 characters inside it
    (inputs, next-character targets).
    """

    name = "gpt-char"
    UNKNOWN = "?"
    OPTIONS = {
        "d_model": (64, _int_opt(1)),
        "n_layers": (2, _int_opt(1)),
        "n_heads": (4, _int_opt(1)),
        "context": (64, _int_opt(1)),
        "batch_size": (16, _int_opt(1)),
        "min_count": (20, _int_opt(1)),
        "val_fraction": (0.1, _float_opt(0.0, strict=True, maximum=1.0)),
        "eval_batches": (8, _int_opt(1)),
        "train_eval_batches": (4, _int_opt(1)),
    }
    # lr 0.05 / beta 0.15 (was 0.03 / 0.3, see BENCHMARKS.md "bytes"): compressed uplinks need the
    # smoother momentum (each worker's EF21 estimator G_j then tracks M_j with less error; quant:4 up:
    # 200 -> 160 rounds to the bench target), and identity gains from both too.
    # `efmuon simulate`, 4 workers, seed 0, identity both ways: val loss 4.58 -> 2.28 (50 rounds)
    # -> 1.91 (100) -> 1.66 (150) -> 1.44 (300; old defaults 1.50);
    # unigram entropy of the validation text is 3.13. With the default quant:3:256 / sign:256:
    # 1.55 after 300 rounds. (No 1-D parameters: bias_rms unused.)
    defaults = {"lr": 0.05, "beta": 0.15, "rounds": 300, "schedule": "cosine", "warmup": 0,
                "preset": "muon", "lr_mult": {"sign": 8.0, "bias_rms": 1.0}}

    def __init__(self, n_workers: int, seed: int, options: dict):
        super().__init__(n_workers, seed, options)
        if options["d_model"] % options["n_heads"]:
            raise ConfigError(f"gpt-char: d_model={options['d_model']} must be divisible by "
                              f"n_heads={options['n_heads']}")
        text = load_corpus()
        self.corpus_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        counts = collections.Counter(text)
        keep = {ch for ch, c in counts.items() if c >= options["min_count"]} | {self.UNKNOWN}
        self.vocab: list[str] = sorted(keep)
        self.stoi = {ch: i for i, ch in enumerate(self.vocab)}
        unk = self.stoi[self.UNKNOWN]
        table = np.full(max(map(ord, counts)) + 1, unk, dtype=np.int64)
        for ch, i in self.stoi.items():
            table[ord(ch)] = i
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        self.data = torch.from_numpy(table[codes])  # int64 token ids of the whole corpus
        T = options["context"]
        self.n_train = int(len(self.data) * (1.0 - options["val_fraction"]))
        self.train_data = self.data[: self.n_train]
        self.val_data = self.data[self.n_train:]
        if len(self.val_data) < T + 1:
            raise ConfigError(f"gpt-char: validation text shorter than context+1={T + 1}")
        self.bounds = [self.n_train * j // n_workers for j in range(n_workers + 1)]
        shortest = min(b - a for a, b in zip(self.bounds, self.bounds[1:]))
        if shortest < 4 * (T + 1):
            raise ConfigError(f"gpt-char: n_workers={n_workers} leaves a training slice of "
                              f"{shortest} characters; need at least {4 * (T + 1)}")
        self._offsets = torch.arange(T + 1)
        bs = options["batch_size"]
        g = _generator("gpt-char", seed, "val")
        starts = torch.randint(0, len(self.val_data) - T, (options["eval_batches"] * bs,),
                               generator=g)
        self._val_windows = self.val_data[starts[:, None] + self._offsets]
        per_worker = -(-options["train_eval_batches"] * bs // n_workers)
        windows = []
        for j in range(n_workers):
            g = _generator("gpt-char", seed, n_workers, "train_eval", j)
            lo, hi = self.bounds[j], self.bounds[j + 1]
            s = torch.randint(lo, hi - T, (per_worker,), generator=g)
            windows.append(self.train_data[s[:, None] + self._offsets])
        self._train_windows = torch.cat(windows)
        self.embedding_names = frozenset({"wte.weight", "wpe.weight"})
        self.head_names = frozenset({"lm_head.weight"})

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, s: str) -> torch.Tensor:
        unk = self.stoi[self.UNKNOWN]
        return torch.tensor([self.stoi.get(ch, unk) for ch in s], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def describe(self) -> dict:
        d = super().describe()
        d["corpus_sha256"] = self.corpus_sha256
        return d

    def build_model(self) -> nn.Module:
        o = self.options
        return GPT.build(_generator("gpt-char", self.seed, "init"), vocab_size=self.vocab_size,
                         context=o["context"], d_model=o["d_model"], n_layers=o["n_layers"],
                         n_heads=o["n_heads"])

    def batch(self, worker: int, round: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(worker, round)
        T, bs = self.options["context"], self.options["batch_size"]
        lo, hi = self.bounds[worker], self.bounds[worker + 1]
        g = _generator("gpt-char", self.seed, self.n_workers, "batch", int(worker), int(round))
        starts = torch.randint(lo, hi - T, (bs,), generator=g)
        w = self.train_data[starts[:, None] + self._offsets]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def _windows_loss(self, model: nn.Module, windows: torch.Tensor) -> float:
        return float(self.loss(model, (windows[:, :-1], windows[:, 1:])))

    def train_eval_loss(self, model: nn.Module) -> float:
        """Mean loss on a fixed set of training windows, equally many from every worker's slice."""
        return self._windows_loss(model, self._train_windows)

    def eval_loss(self, model: nn.Module) -> float:
        """Mean loss on a fixed set of validation windows."""
        return self._windows_loss(model, self._val_windows)

    def unigram_entropy(self, split: str = "val") -> float:
        """Entropy (nats) of the character distribution: the loss of the best context-free model."""
        data = self.val_data if split == "val" else self.train_data
        p = torch.bincount(data, minlength=self.vocab_size).double() / len(data)
        p = p[p > 0]
        return float(-(p * p.log()).sum())


# --------------------------------------------------------------------------- factory

_CLASSES: dict[str, type[Task]] = {"lsq": LsqTask, "digits": DigitsTask, "gpt-char": GptCharTask}


def make_task(name: str, n_workers: int, seed: int = 0, **options: Any) -> Task:
    """Build a task. Unknown names or options raise ``ConfigError`` listing the valid ones."""
    if name not in _CLASSES:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {list(TASKS)}")
    if isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer)) or n_workers < 1:
        raise ConfigError(f"n_workers={n_workers!r} must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed={seed!r} must be an integer")
    cls = _CLASSES[name]
    resolved = _resolve_options(name, cls.OPTIONS, options)
    return cls(int(n_workers), int(seed), resolved)

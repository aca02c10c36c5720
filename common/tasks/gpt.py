"""The ``gpt`` task: a byte-level GPT in three sizes, up to the GPT-2 small shape, on text that ships
with Python.

``size`` picks a preset (every entry can be overridden by its own task option)::

    size    n_layers  d_model  n_heads  context  batch_size  parameters (vocab 256, tied)
    small   2         128      4        128      8             0.44M   (tests, smoke runs)
    10m     6         384      6        256      8            10.8M    (the CPU-sized model)
    124m    12        768      12       1024     4            85.9M    (GPT-2 small's shape)

The model is `gptchar.GPT` with GPT-2's tied embedding (``tie=true``: the output head is
``wte.weight``; ``tie=false`` adds an untied ``lm_head.weight``). The tokenizer is the UTF-8 bytes
(vocabulary 256, nothing to download); ``vocab`` pads the vocabulary (``vocab=50257`` is GPT-2's,
which gives the 124m preset 124.3M parameters (GPT-2 small's 124.4M, less its biases and LayerNorm weights); the rows past 256 never occur as inputs).
GPT-2 small's 124M are 85.0M in the blocks plus 38.6M of its 50257-token embedding; with 256 byte
tokens the same shape has 85.9M.

Corpus (`load_corpus`): the prose of ``pydoc_data.topics`` (as gpt-char) followed by every top-level
``.py`` file of the standard library in sorted order, as bytes, about 5 MB on CPython 3.11; it depends
on the Python installation (``corpus_sha256`` identifies it). Split, shards, batches and the
evaluation windows are gpt-char's: the first 90% is training text, worker j owns the j-th contiguous
slice of it, a batch is ``batch_size`` random windows of ``context`` + 1 bytes.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Task, _generator, _on_model_device
from .gptchar import GPT
from .gptchar import load_corpus as char_corpus
from .options import _bool_opt, _choice_opt, _float_opt, _int_opt

SIZES = {
    "small": {"n_layers": 2, "d_model": 128, "n_heads": 4, "context": 128, "batch_size": 8,
              "eval_batches": 4, "train_eval_batches": 2},
    "10m": {"n_layers": 6, "d_model": 384, "n_heads": 6, "context": 256, "batch_size": 8,
            "eval_batches": 4, "train_eval_batches": 2},
    "124m": {"n_layers": 12, "d_model": 768, "n_heads": 12, "context": 1024, "batch_size": 4,
             "eval_batches": 1, "train_eval_batches": 1},
}
BYTES = 256


def gpt_parameters(n_layers: int, d_model: int, context: int, vocab: int = BYTES, tie: bool = True) -> int:
    """The parameter count of `GPT` (no biases, no LayerNorm weights): embeddings + 12 d^2 per block."""
    return (1 if tie else 2) * vocab * d_model + context * d_model + 12 * n_layers * d_model * d_model


@functools.lru_cache(maxsize=1)
def load_corpus() -> bytes:
    """pydoc_data.topics (sorted keys) and then the stdlib's top-level .py files (sorted), as UTF-8 bytes."""
    parts = [char_corpus().encode("utf-8")]
    for path in sorted(glob.glob(os.path.join(sysconfig.get_path("stdlib"), "*.py"))):
        with open(path, "rb") as fh:
            parts.append(fh.read())
    return b"\n".join(parts)


class GptTask(Task):
    """Byte-level GPT (module docstring): `size` small / 10m / 124m, tied embedding."""

    name = "gpt"
    OPTIONS = {
        "size": ("10m", _choice_opt(tuple(SIZES))),
        "n_layers": (None, _int_opt(1, allow_none=True)),
        "d_model": (None, _int_opt(1, allow_none=True)),
        "n_heads": (None, _int_opt(1, allow_none=True)),
        "context": (None, _int_opt(1, allow_none=True)),
        "batch_size": (None, _int_opt(1, allow_none=True)),
        "eval_batches": (None, _int_opt(1, allow_none=True)),
        "train_eval_batches": (None, _int_opt(1, allow_none=True)),
        "vocab": (BYTES, _int_opt(BYTES)),
        "tie": (True, _bool_opt),
        "val_fraction": (0.1, _float_opt(0.0, strict=True, maximum=1.0)),
    }
    # gpt-char's tuned settings (BENCHMARKS.md "bytes"), not tuned again at these sizes; the 124m preset
    # evaluates every 10 rounds (an evaluation is 3 forward passes over the eval windows on the server).
    defaults = {"lr": 0.05, "beta": 0.15, "rounds": 300, "schedule": "cosine", "warmup": 0,
                "preset": "muon", "lr_mult": {"sign": 8.0, "bias_rms": 1.0}}

    def __init__(self, n_workers: int, seed: int, options: dict):
        preset = SIZES[options["size"]]
        options = {k: (preset[k] if v is None and k in preset else v) for k, v in options.items()}
        super().__init__(n_workers, seed, options)
        if options["size"] == "124m":
            self.defaults["eval_every"] = 10
        if options["d_model"] % options["n_heads"]:
            raise ConfigError(f"gpt: d_model={options['d_model']} must be divisible by "
                              f"n_heads={options['n_heads']}")
        data = load_corpus()
        self.corpus_sha256 = hashlib.sha256(data).hexdigest()
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # token ids = bytes (1 B each)
        T = options["context"]
        self.n_train = int(len(self.data) * (1.0 - options["val_fraction"]))
        self.train_data = self.data[: self.n_train]
        self.val_data = self.data[self.n_train:]
        if len(self.val_data) < T + 1:
            raise ConfigError(f"gpt: validation text ({len(self.val_data)} bytes) shorter than context+1={T + 1}; "
                              f"lower context or raise val_fraction")
        self.bounds = [self.n_train * j // n_workers for j in range(n_workers + 1)]
        shortest = min(b - a for a, b in zip(self.bounds, self.bounds[1:]))
        if shortest < 4 * (T + 1):
            raise ConfigError(f"gpt: n_workers={n_workers} leaves a training slice of {shortest} bytes; "
                              f"need at least {4 * (T + 1)} (4 windows of context+1)")
        self._offsets = torch.arange(T + 1)
        bs = options["batch_size"]
        g = _generator("gpt", seed, "val")
        starts = torch.randint(0, len(self.val_data) - T, (options["eval_batches"] * bs,), generator=g)
        self._val_windows = self.val_data[starts[:, None] + self._offsets]
        per_worker = -(-options["train_eval_batches"] * bs // n_workers)
        windows = []
        for j in range(n_workers):
            g = _generator("gpt", seed, n_workers, "train_eval", j)
            lo, hi = self.bounds[j], self.bounds[j + 1]
            s = torch.randint(lo, hi - T, (per_worker,), generator=g)
            windows.append(self.train_data[s[:, None] + self._offsets])
        self._train_windows = torch.cat(windows)
        self.embedding_names = frozenset({"wte.weight", "wpe.weight"})
        self.head_names = frozenset() if options["tie"] else frozenset({"lm_head.weight"})

    @property
    def vocab_size(self) -> int:
        return self.options["vocab"]

    @property
    def n_parameters(self) -> int:
        o = self.options
        return gpt_parameters(o["n_layers"], o["d_model"], o["context"], o["vocab"], o["tie"])

    def model_summary(self) -> str:
        """One line for --print-config: the shape and the parameter count."""
        o = self.options
        return (f"model: gpt size={o['size']}: {o['n_layers']} layers, d_model {o['d_model']}, {o['n_heads']} heads, "
                f"context {o['context']}, vocab {o['vocab']} (bytes{'' if o['vocab'] == BYTES else ', padded'}), "
                f"{'tied' if o['tie'] else 'untied'} embedding: {self.n_parameters:,} parameters "
                f"({self.n_parameters / 1e6:.1f}M); batch {o['batch_size']} x {o['context']} tokens")

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor(list(s.encode("utf-8")), dtype=torch.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < BYTES).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        d = super().describe()
        d["corpus_sha256"] = self.corpus_sha256
        d["parameters"] = self.n_parameters
        return d

    def build_model(self) -> nn.Module:
        o = self.options
        return GPT.build(_generator("gpt", self.seed, "init"), vocab_size=o["vocab"], context=o["context"],
                         d_model=o["d_model"], n_layers=o["n_layers"], n_heads=o["n_heads"], tie=o["tie"])

    def batch(self, worker: int, round: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(worker, round)
        T, bs = self.options["context"], self.options["batch_size"]
        lo, hi = self.bounds[worker], self.bounds[worker + 1]
        g = _generator("gpt", self.seed, self.n_workers, "batch", int(worker), int(round))
        starts = torch.randint(lo, hi - T, (bs,), generator=g)
        w = self.train_data[starts[:, None] + self._offsets].long()
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = _on_model_device(model, *batch)
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def _windows_loss(self, model: nn.Module, windows: torch.Tensor) -> float:
        """Mean loss over `windows`, one batch_size at a time (the 124m model's activations stay a batch's)."""
        bs, total = self.options["batch_size"], 0.0
        for i in range(0, len(windows), bs):
            w = windows[i:i + bs].long()
            total += float(self.loss(model, (w[:, :-1], w[:, 1:]))) * len(w)
        return total / len(windows)

    def train_eval_loss(self, model: nn.Module) -> float:
        """Mean loss on a fixed set of training windows, equally many from every worker's slice."""
        return self._windows_loss(model, self._train_windows)

    def eval_loss(self, model: nn.Module) -> float:
        """Mean loss on a fixed set of validation windows."""
        return self._windows_loss(model, self._val_windows)

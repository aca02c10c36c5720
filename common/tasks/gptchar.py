"""The ``gpt-char`` task: a small character-level GPT on the pydoc topics corpus, and the model.

The model is a plain ``nn.Module`` with a stable parameter order::

    wte.weight                      (vocab, d_model)     token embedding    -> sign LMO
    wpe.weight                      (context, d_model)   position embedding -> sign LMO
    blocks.{i}.attn.c_attn.weight   (3 d_model, d_model) fused q, k, v      -> spectral
    blocks.{i}.attn.c_proj.weight   (d_model, d_model)                      -> spectral
    blocks.{i}.mlp.c_fc.weight      (4 d_model, d_model)                    -> spectral
    blocks.{i}.mlp.c_proj.weight    (d_model, 4 d_model)                    -> spectral
    lm_head.weight                  (vocab, d_model)     untied output head -> sign LMO
                                                         (absent with tie=True: the head is wte)

Linear layers have no bias and LayerNorm has no learnable parameters, so every parameter is a
matrix. Weights are initialised only through :meth:`GPT.init_weights` with an explicit
``torch.Generator``; the module is constructed under a forked RNG (`base._build_off_rng`), so that
constructing it never changes the global RNG.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Task, _build_off_rng, _generator, _on_model_device
from .options import _float_opt, _int_opt


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=False)
        self.c_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        h = self.n_heads
        q = q.view(b, t, h, c // h).transpose(1, 2)
        k = k.view(b, t, h, c // h).transpose(1, 2)
        v = v.view(b, t, h, c // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.c_proj = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        x = x + self.attn(F.layer_norm(x, (d,)))
        x = x + self.mlp(F.layer_norm(x, (d,)))
        return x


class GPT(nn.Module):
    """Pre-LayerNorm decoder-only transformer; ``forward(idx) -> logits (B, T, vocab)``."""

    def __init__(self, vocab_size: int, context: int, d_model: int = 64, n_layers: int = 2,
                 n_heads: int = 4, tie: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.vocab_size = vocab_size
        self.context = context
        self.d_model = d_model
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList([Block(d_model, n_heads) for _ in range(n_layers)])
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie:  # GPT-2's tied embedding: one (vocab, d_model) matrix, named wte.weight
            self.lm_head.weight = self.wte.weight

    @classmethod
    def build(cls, generator: torch.Generator, **kwargs) -> "GPT":
        """Construct without touching the global RNG and initialise from ``generator``."""
        model = _build_off_rng(lambda: cls(**kwargs))
        model.init_weights(generator)
        return model

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        std = 0.02
        proj_std = std / math.sqrt(2 * len(self.blocks))
        for name, p in self.named_parameters():  # stable order -> deterministic draws
            s = proj_std if name.endswith("c_proj.weight") else std
            nn.init.normal_(p, mean=0.0, std=s, generator=generator)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        x = F.layer_norm(x, (self.d_model,))
        return self.lm_head(x)


@functools.lru_cache(maxsize=1)
def load_corpus() -> str:
    """The English prose of Python's own ``pydoc_data.topics`` (sorted keys, concatenated).

    Ships with CPython, so nothing is downloaded; its content depends on the Python version
    (``GptCharTask.corpus_sha256`` identifies it so that processes can check they agree).
    """
    from pydoc_data.topics import topics  # lazy: a large stdlib data module
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
    # lr 0.075 / beta 0.3 (was 0.05 / 0.15, and before that 0.03 / 0.3; BENCHMARKS.md "rounds" and "bytes"):
    # the default pairing (quant:3:256 up / sign:256 down) reaches `bench peers`' target (validation loss
    # 1.90, constant lr) in 135 rounds at seeds 0, 1 and 2 (was 140 / 140 / 165), and on `bench bytes`'
    # setting in 180 rounds (was 200), 0.91x the bytes; identity both ways is unchanged within one
    # evaluation (105 / 110 / 105 rounds, was 105 / 100 / 105). A larger lr wants the lighter momentum; lr
    # 0.1 / beta 0.5 saves a little more at seed 0 but costs identity and sits next to a cliff (0.125:
    # 200 rounds; the sign layers step at 8x the lr).
    # `efmuon simulate`, 4 workers, seed 0, 300 rounds, cosine: final validation loss identity both ways
    # 1.44 (old defaults 1.44), the default quant:3:256 / sign:256 1.50 (old defaults 1.55); unigram
    # entropy of the validation text is 3.13. (No 1-D parameters: bias_rms unused.)
    defaults = {"lr": 0.075, "beta": 0.3, "rounds": 300, "schedule": "cosine", "warmup": 0,
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
        x, y = _on_model_device(model, *batch)
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


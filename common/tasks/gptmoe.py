"""The ``gpt-moe`` task: gpt-char's data (the pydoc topics corpus, byte/char level, nothing downloaded)
with a GPT whose attention is Multi-head Latent Attention and whose feed-forward is a Mixture of Experts,
the architecture of "Muon: Training and Trade-offs with Latent Attention and MoE" (arXiv 2509.24406).

Parameters, in order (per block i; no biases, LayerNorms without parameters)::

    wte.weight, wpe.weight                      embeddings                         -> sign
    blocks.{i}.attn.q_down.weight  (q_latent, d_model)  low-rank query (q_latent > 0) -> spectral
    blocks.{i}.attn.q_up.weight    (d_model, q_latent)                                 -> spectral
      or blocks.{i}.attn.q_proj.weight (d_model, d_model)  (q_latent = 0)             -> spectral
    blocks.{i}.attn.kv_down.weight (d_latent, d_model)  x -> c_kv, the compressed KV  -> spectral
    blocks.{i}.attn.k_up.weight    (d_model, d_latent)  c_kv -> k (all heads)          -> spectral
    blocks.{i}.attn.v_up.weight    (d_model, d_latent)  c_kv -> v (all heads)          -> spectral
    blocks.{i}.attn.c_proj.weight  (d_model, d_model)                                  -> spectral
    blocks.{i}.moe.router.weight   (experts, d_model)   router logits                  -> spectral
    blocks.{i}.moe.experts_in      (experts, d_ff, d_model)  ONE 3-D parameter        -> spectral, per expert
    blocks.{i}.moe.experts_out     (experts, d_model, d_ff)                            -> spectral, per expert
    lm_head.weight                                  untied head                        -> sign

MLA (DeepSeek-V2 without the decoupled RoPE key: positions are learned): c_kv = LN(x W_dkv^T) of
d_latent dims is what a KV cache would hold; k = c_kv W_uk^T, v = c_kv W_uv^T per head; the query is
x W_q^T or, with q_latent > 0, LN(x W_dq^T) W_uq^T. MoE: softmax router, the top_k experts per token
with their probabilities renormalised as gates; every expert is evaluated on every token by two batched
einsums over the (E, ...) weights (no loop over experts; at this size dense is cheaper than a dispatch)
and the gates, zero outside the top k, combine them. Load balancing (Switch Transformer):
aux = E * sum_e f_e P_e (f_e: the share of top-k assignments to e, P_e: the mean router probability),
added to the training loss with weight ``aux_weight``; the evaluation losses are the cross-entropy alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import _build_off_rng, _generator
from .gptchar import GptCharTask
from .options import _float_opt, _int_opt


class LatentAttention(nn.Module):
    """Multi-head Latent Attention: keys and values from one low-rank latent c_kv per token."""

    def __init__(self, d_model: int, n_heads: int, d_latent: int, q_latent: int):
        super().__init__()
        self.n_heads, self.d_latent, self.q_latent = n_heads, d_latent, q_latent
        if q_latent:
            self.q_down = nn.Linear(d_model, q_latent, bias=False)
            self.q_up = nn.Linear(q_latent, d_model, bias=False)
        else:
            self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_down = nn.Linear(d_model, d_latent, bias=False)
        self.k_up = nn.Linear(d_latent, d_model, bias=False)
        self.v_up = nn.Linear(d_latent, d_model, bias=False)
        self.c_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.n_heads
        if self.q_latent:
            q = self.q_up(F.layer_norm(self.q_down(x), (self.q_latent,)))
        else:
            q = self.q_proj(x)
        c_kv = F.layer_norm(self.kv_down(x), (self.d_latent,))
        k, v = self.k_up(c_kv), self.v_up(c_kv)
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MoE(nn.Module):
    """Top-k mixture of GELU experts; `forward` returns (output, load-balancing loss)."""

    def __init__(self, d_model: int, d_ff: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts_in = nn.Parameter(torch.empty(experts, d_ff, d_model))
        self.experts_out = nn.Parameter(torch.empty(experts, d_model, d_ff))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        probs = self.router(x).softmax(dim=-1)  # (N, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, top_i, top_p / top_p.sum(-1, keepdim=True))
        hidden = F.gelu(torch.einsum("nd,efd->nef", x, self.experts_in))  # every expert, batched
        y = torch.einsum("nef,edf,ne->nd", hidden, self.experts_out, gates)
        experts = probs.shape[-1]
        share = torch.zeros_like(probs).scatter(1, top_i, 1.0).mean(0) / self.top_k  # f_e (no gradient)
        aux = experts * (share * probs.mean(0)).sum()
        return y.reshape(shape), aux


class MoEBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_latent, q_latent, d_ff, experts, top_k):
        super().__init__()
        self.attn = LatentAttention(d_model, n_heads, d_latent, q_latent)
        self.moe = MoE(d_model, d_ff, experts, top_k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = x.shape[-1]
        x = x + self.attn(F.layer_norm(x, (d,)))
        y, aux = self.moe(F.layer_norm(x, (d,)))
        return x + y, aux


class MoEGPT(nn.Module):
    """``forward(idx) -> (logits (B, T, vocab), mean load-balancing loss over the blocks)``."""

    def __init__(self, vocab_size: int, context: int, d_model: int, n_layers: int, n_heads: int,
                 d_latent: int, q_latent: int, d_ff: int, experts: int, top_k: int):
        super().__init__()
        self.context, self.d_model = context, d_model
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList([MoEBlock(d_model, n_heads, d_latent, q_latent, d_ff, experts, top_k)
                                     for _ in range(n_layers)])
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        std = 0.02
        proj_std = std / math.sqrt(2 * len(self.blocks))
        for name, p in self.named_parameters():  # stable order -> deterministic draws
            s = proj_std if name.endswith(("c_proj.weight", "experts_out")) else std
            nn.init.normal_(p, mean=0.0, std=s, generator=generator)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        aux = x.new_zeros(())
        for block in self.blocks:
            x, a = block(x)
            aux = aux + a
        return self.lm_head(F.layer_norm(x, (self.d_model,))), aux / len(self.blocks)


class GptMoeTask(GptCharTask):
    """gpt-char's corpus, vocabulary, shards, batches and evaluation windows, with `MoEGPT`."""

    name = "gpt-moe"
    OPTIONS = {
        **GptCharTask.OPTIONS,
        "d_latent": (32, _int_opt(1)),
        "q_latent": (32, _int_opt(0)),
        "experts": (4, _int_opt(1)),
        "top_k": (2, _int_opt(1)),
        "d_ff": (128, _int_opt(1)),
        "aux_weight": (0.01, _float_opt(0.0)),
    }
    # Tuned by hand on `efmuon simulate --task gpt-moe` (4 workers, seed 0, default compression); the
    # `adamw` table is what the preset adamw uses instead (BENCHMARKS.md, "moe").
    defaults = {"lr": 0.05, "beta": 0.15, "rounds": 300, "schedule": "cosine", "warmup": 0,
                "preset": "muon", "lr_mult": {"sign": 8.0, "bias_rms": 1.0},
                "adamw": {"lr": 3e-3, "beta": 1.0, "warmup": 0}}

    def __init__(self, n_workers: int, seed: int, options: dict):
        if options["top_k"] > options["experts"]:
            raise ConfigError(f"gpt-moe: top_k={options['top_k']} must be at most experts={options['experts']}")
        super().__init__(n_workers, seed, options)
        self.stacked_names = frozenset(f"blocks.{i}.moe.{w}" for i in range(options["n_layers"])
                                       for w in ("experts_in", "experts_out"))

    def build_model(self) -> nn.Module:
        o = self.options
        keys = ("context", "d_model", "n_layers", "n_heads", "d_latent", "q_latent", "d_ff", "experts", "top_k")
        model = _build_off_rng(lambda: MoEGPT(vocab_size=self.vocab_size, **{k: o[k] for k in keys}))
        model.init_weights(_generator("gpt-moe", self.seed, "init"))
        return model

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        logits, aux = model(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return ce + self.options["aux_weight"] * aux if self.options["aux_weight"] else ce

    @torch.no_grad()
    def _windows_loss(self, model: nn.Module, windows: torch.Tensor) -> float:
        logits, _ = model(windows[:, :-1])
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))

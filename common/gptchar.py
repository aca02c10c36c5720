"""A small character-level GPT used by the ``gpt-char`` task.

Plain ``nn.Module`` with a stable parameter order::

    wte.weight                      (vocab, d_model)     token embedding    -> sign LMO
    wpe.weight                      (context, d_model)   position embedding -> sign LMO
    blocks.{i}.attn.c_attn.weight   (3 d_model, d_model) fused q, k, v      -> spectral
    blocks.{i}.attn.c_proj.weight   (d_model, d_model)                      -> spectral
    blocks.{i}.mlp.c_fc.weight      (4 d_model, d_model)                    -> spectral
    blocks.{i}.mlp.c_proj.weight    (d_model, 4 d_model)                    -> spectral
    lm_head.weight                  (vocab, d_model)     untied output head -> sign LMO

Linear layers have no bias and LayerNorm has no learnable parameters, so every parameter is a
matrix. Weights are initialised only through :meth:`GPT.init_weights` with an explicit
``torch.Generator``; the module is first built on the ``meta`` device so that constructing it
never touches (or consumes) the global RNG.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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
                 n_heads: int = 4):
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

    @classmethod
    def build(cls, generator: torch.Generator, **kwargs) -> "GPT":
        """Construct without touching the global RNG and initialise from ``generator``."""
        with torch.device("meta"):
            model = cls(**kwargs)
        model = model.to_empty(device="cpu")
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

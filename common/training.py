"""Glue between a torch model and the algorithm's parameter lists (shared by simulator and worker)."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from efmuon.common.config import RunConfig
from efmuon.common.lmo import LayerSpec, assign_norms_for_model


MMAP_THRESHOLD = 256 * 1024  # bytes; glibc's default starts at 128 KiB and grows up to 32 MiB


LARGE_MODEL_BYTES = 64 << 20  # allocator tuning pays off from here (BENCHMARKS.md, memory)


def return_freed_memory(model_bytes: int | None = None) -> None:
    """Make glibc serve allocations >= 256 KiB by mmap and give them back to the OS when freed.

    glibc's default mmap threshold is dynamic: after the first free of an mmapped block it rises to
    that block's size, so later 1 MiB chunk buffers and per-layer tensors come from the heap, whose
    freed memory mostly stays resident (BENCHMARKS.md, memory: ~3 model copies on the server, ~2.5
    on a worker). Setting the threshold fixes it (and turns the dynamic adjustment off). Linux/glibc
    only; `MALLOC_MMAP_THRESHOLD_` in the environment (glibc's own tunable) takes precedence.
    Only for models of at least LARGE_MODEL_BYTES (when `model_bytes` is given): every allocation
    above the threshold then costs page faults, which on the small built-in models cost more time
    (the default `efmuon run`: 81 s instead of 53 s wall) than the memory is worth."""
    if model_bytes is not None and model_bytes < LARGE_MODEL_BYTES:
        return
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def configure_torch(threads: int) -> None:
    """Fix the thread count (matmul results can depend on it) so separate processes agree bit for bit.
    The server and the worker call `return_freed_memory(model_bytes)` once they know the model's size."""
    torch.set_num_threads(max(1, int(threads)))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # torch.use_deterministic_algorithms is not needed on CPU (our kernels are deterministic for a
    # fixed thread count) and importing it pulls in torch._inductor (~2 s).


def resolve_device(device: str) -> torch.device:
    """'auto' picks cuda when present; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from efmuon.common.errors import ConfigError

        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(device)


def model_specs(model: torch.nn.Module, cfg: RunConfig, embedding_names=(), head_names=()) -> list[LayerSpec]:
    """Layer norms for every parameter of `model`, from the preset and the config's overrides."""
    from efmuon.common.lmo import assign_norms

    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    emb = set(embedding_names) | {
        f"{mn}.weight" if mn else "weight"
        for mn, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding)
    }
    return assign_norms(names, preset=cfg.preset, overrides=cfg.norms or None,
                        embedding_names=emb, head_names=set(head_names))


def parameters_of(model: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    names, params = zip(*[(n, p.detach().clone()) for n, p in model.named_parameters()])
    return list(names), list(params)


def load_parameters(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, w in zip(model.parameters(), params):
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

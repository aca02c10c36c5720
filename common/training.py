"""Glue between a torch model and the algorithm's parameter lists (shared by simulator and worker)."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from efmuon.common.config import RunConfig
from efmuon.common.lmo import LayerSpec, assign_norms_for_model


MMAP_THRESHOLD = 64 * 1024  # bytes; glibc's default starts at 128 KiB and grows up to 32 MiB


# Allocator tuning pays off from here (BENCHMARKS.md, memory): a 10M-parameter model (40 MB) is
# above, the built-in tasks (gpt-char 0.44 MiB) far below, so the default `efmuon run` is unaffected.
LARGE_MODEL_BYTES = 16 << 20


def return_freed_memory(model_bytes: int | None = None) -> None:
    """Make glibc serve allocations >= 64 KiB by mmap and give them back to the OS when freed.

    glibc's default mmap threshold is dynamic: after the first free of an mmapped block it rises to
    that block's size, so later 1 MiB chunk buffers and per-layer tensors come from the heap, whose
    freed memory mostly stays resident (BENCHMARKS.md, memory: ~3 model copies on the server, ~2.5
    on a worker). Setting the threshold fixes it (and turns the dynamic adjustment off). 64 KiB
    rather than 256 KiB also sends gRPC's receive buffers to mmap: a large message arriving faster
    than Python reads it is buffered in pieces of 64-256 KiB, which otherwise leave ~0.5-1 model
    copy of freed but resident heap behind (10M parameters: server 7.9 -> 7.5, worker 4.7-5.0 -> 4.5
    copies; the server's CPU time per run was the same within noise). Linux/glibc only;
    `MALLOC_MMAP_THRESHOLD_` in the environment (glibc's own tunable) takes precedence.
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


def trim_heap(model_bytes: int | None = None) -> None:
    """Give the heap's free pages back to the OS now (glibc `malloc_trim(0)`), for models of at least
    LARGE_MODEL_BYTES (when `model_bytes` is given).

    For after a model copy was dropped that was allocated before `return_freed_memory` took effect
    (a model built by the caller, whose layer tensors and construction temporaries came from the
    heap): with the fixed mmap threshold nothing large is served from the heap any more, so those
    free pages would stay resident for the whole run (~1 model copy; BENCHMARKS.md, memory). One
    walk over the heap, milliseconds; Linux/glibc only."""
    if model_bytes is not None and model_bytes < LARGE_MODEL_BYTES:
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
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

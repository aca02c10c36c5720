"""The process a run lives in: torch threads and device, and how freed memory goes back to the OS.

`configure_torch` fixes the thread count (matmul results can depend on it, so processes that must agree
bit for bit use the same count); `resolve_device` turns cpu/cuda/auto into a device or a clear error;
`return_freed_memory` and `trim_heap` tune glibc's allocator for large models (BENCHMARKS.md, memory);
`rss_bytes` reads this process's resident memory.
"""
from __future__ import annotations

import os
import sys

import torch

from .errors import ConfigError

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


def resolve_device(device: str) -> torch.device:
    """'auto' picks cuda when present; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():

        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(device)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes (getrusage; Linux counts kB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)

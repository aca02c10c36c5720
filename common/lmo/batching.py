"""How `lmo_all` runs Newton-Schulz on many layers at once: the FLOP model of one step, the cut of
the spectral matrices into batches (`spectral_groups`, an exact dynamic programme), one group's
batched iteration, and the thread policy (`lmo_threads`: every available core once the work is
large enough)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .newton_schulz import _normalise_, _ns_iterate, _schedule
from .norms import matrix_dims

# The fixed cost of one more Newton-Schulz batch, in FLOPs of one step: each batch makes ~4 calls
# per step (Gram, b A + c A^2, diagonal, product) of ~5-10 us each, i.e. ~2 MFLOP at ~60 GFLOP/s
# (one core here).  `spectral_groups` zero-pads matrices into a common batch only while the FLOPs
# spent on zeros stay below the calls it saves, so only tiny matrices are ever padded.
PAD_CALL_FLOPS = 2_000_000


def ns_step_flops(m: int, n: int) -> int:
    """FLOPs of one Newton-Schulz step on an m x n matrix (the iteration runs on min x max):
    Gram 2 r^2 s;  b A + c A A: 2 r^3;  a X + B X: 2 r^2 s  (r = min(m, n), s = max(m, n))."""
    r, s = min(m, n), max(m, n)
    return 4 * r * r * s + 2 * r * r * r


@dataclass(frozen=True)
class SpectralGroup:
    """One Newton-Schulz call of `lmo_all`: layers `idx` (positions in the shape list) run as one
    (len(idx), rows, cols) batch (rows <= cols when padded).  padded: the members' shapes differ (the long
    side shorter than cols, or tall ones among wide ones), so each is copied into a zeroed (rows, cols)
    slot, tall ones transposed; otherwise all are exactly (rows, cols) or all exactly (cols, rows)."""

    idx: tuple[int, ...]
    rows: int
    cols: int
    padded: bool

    @property
    def step_flops(self) -> int:
        """FLOPs of one step as executed (padded shape x batch)."""
        return len(self.idx) * ns_step_flops(self.rows, self.cols)


def spectral_groups(shapes: Sequence[tuple[int, int]]) -> list[SpectralGroup]:
    """How `lmo_all` batches spectral matrices of these (rows, cols) shapes (one dtype and device).

    Matrices with the same short side r are sorted by their long side and cut into consecutive
    batches so that FLOPs executed (each batch at its longest member's size) + PAD_CALL_FLOPS per batch
    is smallest (an exact dynamic programme).  Same-size matrices thus share a batch whatever their
    orientation, and tiny ones (gpt-char's <= 64x256) share one even with different long sides.
    Zero padding along the long side is exact: [X 0] has X's Frobenius norm and Gram matrix, and
    every step maps it to [X' 0].  The short side is never padded (that changed fp32 rounding by
    ~1e-6 in the tests; padding the long side changed nothing)."""
    by_short: dict[int, list[int]] = {}
    for i, (m, n) in enumerate(shapes):
        by_short.setdefault(min(m, n), []).append(i)
    groups: list[SpectralGroup] = []
    for r, idx in by_short.items():
        idx = sorted(idx, key=lambda i: max(shapes[i]))
        longs = [max(shapes[i]) for i in idx]
        best = [0.0] + [math.inf] * len(idx)  # best[j]: cheapest cut of the first j matrices
        cut = [0] * (len(idx) + 1)
        for j in range(1, len(idx) + 1):
            for i in range(j):
                cost = best[i] + (j - i) * ns_step_flops(r, longs[j - 1]) + PAD_CALL_FLOPS
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        j = len(idx)
        batches = []
        while j > 0:
            batches.append(idx[cut[j]:j])
            j = cut[j]
        for members in reversed(batches):
            kinds = {tuple(shapes[i]) for i in members}
            rows, cols = next(iter(kinds)) if len(kinds) == 1 else (r, max(shapes[members[-1]]))
            groups.append(SpectralGroup(tuple(members), rows, cols, len(kinds) > 1))
    return groups


def _ns_group(Gs: Sequence[Tensor], group: SpectralGroup, steps: int, coeffs: str) -> list[Tensor]:
    """Newton-Schulz of every matrix (2-D views) of one group: per matrix a view of the batch's
    result (compute dtype) in the matrix's own shape, the padding cut off; the caller copies it out."""
    G0 = Gs[0]
    dtype = torch.bfloat16 if G0.is_cuda else torch.float32
    schedule = _schedule(coeffs, steps)
    k, rows, cols = len(Gs), group.rows, group.cols
    if group.padded:
        full = all(max(G.shape) == cols for G in Gs)  # only orientations differ: nothing to zero
        X = (torch.empty if full else torch.zeros)(k, rows, cols, dtype=dtype, device=G0.device)
        for j, G in enumerate(Gs):
            m, n = G.shape
            X[j, :, : max(m, n)].copy_(G.mT if m > n else G)  # the stacking copy, transposed if tall
        _normalise_(X, coeffs)
        X = _ns_iterate(X, schedule, tall=False)
        outs = []
        for j, G in enumerate(Gs):
            m, n = G.shape
            outs.append(X[j, :, :m].mT if m > n else X[j, :, :n])
        return outs
    X = torch.stack(Gs) if G0.dtype == dtype else torch.stack([G.to(dtype) for G in Gs])
    _normalise_(X, coeffs)
    X = _ns_iterate(X, schedule, tall=rows > cols)
    return list(X.unbind(0))


# Newton-Schulz work (FLOPs per lmo_all call) from which `lmo_threads` uses every available core:
# below it (e.g. gpt-char's ~150 MFLOP) waking and joining threads costs more than it saves.
LMO_PARALLEL_MIN_FLOPS = 1 << 30


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def lmo_threads(flops: float) -> int:
    """Intra-op threads for `flops` of Newton-Schulz: every available core for large work, else the
    process's current setting (configure_torch's --threads).  In a synchronous round nothing else
    of the run computes while the server takes its step, so the cores are otherwise idle.  On the
    CPUs tested, MKL's sgemm and the norm give bit-identical results for 1 and 2 threads on these
    shapes (tests/test_lmo.py checks it); where they might not, simulator and server still agree,
    since both decide here from the same work and the same machine.  On a machine whose cores are
    busy with other processes the extra threads wait on each other and can be slower than one."""
    if flops >= LMO_PARALLEL_MIN_FLOPS:
        return max(available_cores(), torch.get_num_threads())
    return torch.get_num_threads()


def lmo_units(specs: Sequence, nbytes: Sequence[int]) -> list[list[int]]:
    """The layers that must share one `lmo_all` call, sorted by their first layer: each group of spectral
    matrices that `lmo_all` zero-pads into one batch (`spectral_groups.padded`) together, every other layer
    alone (same-shape matrices may be split: each is its own product in a batch). A stacked (per-expert)
    layer is its own Newton-Schulz call anyway. `nbytes`: each layer's size; empty layers are never batched.
    `ServerState.lmo_blocks` packs these into blocks; the pipelined step (common.pipeline) steps them one by one."""
    n = len(specs)
    spectral = [i for i, s in enumerate(specs) if s.norm == "spectral" and not s.stacked and nbytes[i]]
    units = []
    for g in spectral_groups([matrix_dims(specs[i].shape) for i in spectral]):
        members = [spectral[j] for j in g.idx]
        units.extend([sorted(members)] if g.padded else ([i] for i in members))
    batched = set(spectral)
    units.extend([i] for i in range(n) if i not in batched)
    units.sort(key=min)
    return units


def lmo_blocks(specs: Sequence, nbytes: Sequence[int], min_bytes: int, fraction: float) -> list[list[int]]:
    """The layer blocks of `ServerState.lmo_blocks` (its docstring): the whole model when it is at most
    max(min_bytes, fraction x model) bytes, else consecutive runs of `lmo_units` of about that size."""
    budget = max(min_bytes, fraction * sum(nbytes))
    if sum(nbytes) <= budget:
        return [list(range(len(specs)))]
    blocks, cur, size = [], [], 0
    for u in lmo_units(specs, nbytes):  # layers that must share an lmo_all call
        b = sum(nbytes[i] for i in u)
        if cur and size + b > budget:
            blocks.append(sorted(cur))
            cur, size = [], 0
        cur += u
        size += b
    if cur:
        blocks.append(sorted(cur))
    return blocks

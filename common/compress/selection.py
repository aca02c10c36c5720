"""Exact selection of the k largest entries of a vector (topk's |x|, randk's random keys), without
a full sort: the k-th value is bracketed from a strided sample, one chunked pass gathers the
candidates, and the exact threshold is found among those only (ties always by lower index)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .bits import _CHUNK


def _kth_keep(cv: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask over cv keeping exactly its k largest values, ties by lower position."""
    c = cv.size
    tau = np.partition(cv, c - k)[c - k]
    keep = cv > tau
    need = k - int(np.count_nonzero(keep))
    if need > 0:
        keep[np.flatnonzero(cv == tau)[:need]] = True
    return keep


def _select_largest_np(x: np.ndarray, k: int, use_abs: bool) -> np.ndarray:
    """numpy version of _select_largest on |x| (use_abs) or x; returns strictly increasing int64.

    Exact (ties by lower index).  Large inputs: the k-th value is bracketed [lo, hi] from a strided
    sample; one chunked pass (cache-resident temporaries) gathers the candidates >= lo with their
    values; those > hi are certainly kept and the exact threshold is found by a partition of the
    few candidates inside the bracket only.  Bracket misses fall back to the full partition."""
    d = x.size
    if k >= d:
        return np.arange(d, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, np.int64)
    bracket = _sample_bracket(x, k, use_abs) if d > (1 << 16) else None
    if bracket is None:
        return _select_full(x, k, use_abs)
    lo, hi = bracket
    cand, cv = _gather_at_least(x, lo, use_abs)
    c = cand.size
    if c < k:  # the bracket missed (no candidates at all included)
        return _select_full(x, k, use_abs)
    if c == k:
        return cand
    if hi is not None:
        above = cv > hi
        n_above = int(np.count_nonzero(above))
        if n_above < k:
            band_pos = np.flatnonzero(~above)
            band = cv[band_pos]
            sub = _kth_keep(band, k - n_above)
            above[band_pos[sub]] = True
            return cand[above]
    return cand[_kth_keep(cv, k)]


def _select_full(x: np.ndarray, k: int, use_abs: bool) -> np.ndarray:
    """The exact k largest by one partition of the whole vector (small inputs, bracket misses)."""
    a = np.abs(x) if use_abs else x
    return np.flatnonzero(_kth_keep(a, k))


def _sample_bracket(x: np.ndarray, k: int, use_abs: bool):
    """(lo, hi) bracketing the k-th largest value of |x| or x, read from a strided sample: the
    sample's values at ranks k/d*ns -+ (4 sd + 8); hi is None when the upper rank would be < 1.
    None when the lower rank falls off the sample (k too close to d for a bracket to help)."""
    d = x.size
    stride = max(1, d // 32768)
    samp = x[::stride]
    samp = np.abs(samp) if use_abs else samp.copy()
    ns = samp.size
    p = k / d
    sd = 4.0 * math.sqrt(p * (1 - p) * ns) + 8
    j = int(math.ceil(p * ns + sd))
    if j >= ns:
        return None
    j_hi = int(math.floor(p * ns - sd))  # sample rank of the upper bracket end (may be < 1: no upper end)
    kth = [ns - j] + ([ns - j_hi] if j_hi >= 1 else [])
    part = np.partition(samp, kth)
    lo = part[ns - j]
    hi = part[ns - j_hi] if j_hi >= 1 else None
    return lo, hi


def _gather_at_least(x: np.ndarray, lo, use_abs: bool) -> tuple[np.ndarray, np.ndarray]:
    """(positions, values) of the entries of |x| or x that are >= lo, in increasing position, by
    one chunked pass (the |x| temporaries stay in cache)."""
    d = x.size
    idx_parts, val_parts = [], []
    tmp = np.empty(min(d, _CHUNK), x.dtype) if use_abs else None
    for i in range(0, d, _CHUNK):
        ch = x[i:i + _CHUNK]
        if use_abs:
            a = np.abs(ch, out=tmp[: ch.size])
        else:
            a = ch
        loc = np.flatnonzero(a >= lo)
        if loc.size:
            val_parts.append(a[loc])
            loc += i
            idx_parts.append(loc)
    if not idx_parts:
        return np.zeros(0, np.int64), np.zeros(0, x.dtype)
    return np.concatenate(idx_parts), np.concatenate(val_parts)


def _select_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, strictly increasing) of exactly k largest entries of 1-D ``a``.

    Ties are broken by lower index.  Not a full sort: the k-th value is bracketed from a strided
    sample, candidates above the bracket are gathered (one pass), and the exact threshold is found by
    ``kthvalue`` on the candidates only; if the bracket misses, ``torch.topk`` is the exact fallback.
    """
    d = a.numel()
    dev = a.device
    if k >= d:
        return torch.arange(d, device=dev)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    if d <= (1 << 16):
        idx = torch.topk(a, k, sorted=False).indices
        return torch.sort(idx).values
    stride = max(1, d // 32768)
    samp = a[::stride]
    ns = samp.numel()
    p = k / d
    j = int(math.ceil(p * ns + 4.0 * math.sqrt(p * (1 - p) * ns) + 8))
    cand = None
    if j < ns:
        lo = torch.kthvalue(samp, ns - j + 1).values
        cand = torch.nonzero(a >= lo).squeeze(1)
        if cand.numel() < k:
            cand = None
    if cand is None:
        idx = torch.topk(a, k, sorted=False).indices
        return torch.sort(idx).values
    c = cand.numel()
    cv = a[cand]
    if c == k:
        return cand
    tau = torch.kthvalue(cv, c - k + 1).values
    keep = cv > tau
    need = k - int(keep.sum())
    if need > 0:
        ties = torch.nonzero(cv == tau).squeeze(1)[:need]
        keep[ties] = True
    return cand[keep]


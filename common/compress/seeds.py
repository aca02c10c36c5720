"""The seeded random streams of the frames (part of the frame contract: the same seed gives the
same frame on every machine).

``seed`` is an int64 (or uint64) reduced modulo 2**64.  Each structure derives its own sub-seeds by
SplitMix64 (``_subseed(seed, tag)``), and draws only ``random_raw`` output of numpy's bit
generators (randk: PCG64 here; natural: SFC64, see ``natural._natural_words``), which numpy keeps
stable across versions.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _subseed(seed: int, tag: int) -> int:
    return _splitmix64((int(seed) & _MASK64) ^ _splitmix64(tag))


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(int(seed) & _MASK64))


def _random_u32(seed: int, n: int) -> np.ndarray:
    """n uniform uint32 values from PCG64(seed) (fast path: raw 64-bit draws split in two)."""
    raw = _rng(seed).bit_generator.random_raw((n + 1) // 2)
    return raw.view(np.uint32)[:n]


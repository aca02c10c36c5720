"""Raw float32 frames: the initial W of Join and a re-sync's W and G_j, as little-endian bytes per
parameter, and back into tensors of the fingerprint's shapes."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import FrameError


def raw_frames(params: Sequence[torch.Tensor]) -> list[bytes]:
    """Raw float32 little-endian bytes of each tensor (the initial W at Join)."""
    return [p.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy().tobytes() for p in params]


def tensors_from_raw(frames: Sequence, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    out = []
    for f, shape in zip(frames, shapes):
        n = 1
        for s in shape:
            n *= int(s)
        if len(f) != 4 * n:
            raise FrameError(f"initial W frame of shape {tuple(shape)} has {len(f)} bytes, expected {4 * n}")
        buf = f if isinstance(f, memoryview) and not f.readonly else bytearray(f)
        t = torch.frombuffer(buf, dtype=torch.float32) if n else torch.zeros(0)
        out.append(t.reshape(tuple(int(s) for s in shape)))
    return out

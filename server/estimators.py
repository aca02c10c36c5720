"""Where the server keeps each client's estimator G_j (`--estimators fp32|bf16|disk`).

The server keeps every G_j so that a client that lost its state can be re-synced (docs/design.md
section 6) and so that G stays the mean of all n estimators when some clients skip a round.
`ServerState.estimators` is used as a mapping ``{client: [tensor per layer]}`` that
`ServerState.apply_decoded` updates in place (``e.add_(r)``) or assigns; `EstimatorStore` is
that mapping with a storage policy:

  fp32  (default) exact float32 tensors in memory: a re-synced G_j is bit-identical to the
        worker's, so a re-synced worker continues exactly (its momentum aside).
  bf16  bfloat16 tensors in memory: half the memory. Every update rounds G_j to bfloat16, so a
        re-synced G_j is only approximately the worker's (relative error ~2^-8 per entry, which
        the worker's next EF21 difference then corrects). G itself stays exact float32.
  disk  float32 np.memmap files under DIR (the checkpoint directory's `estimators/`): exact,
        and the OS pages them in and out, so resident memory stays bounded for many clients.

Only the aggregate G (float32, in memory) enters the algorithm's step; estimators are read only
to re-sync a client and to checkpoint.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path

import numpy as np
import torch

MODES = ("fp32", "bf16", "disk")


class EstimatorStore(MutableMapping):
    def __init__(self, shapes: Sequence[Sequence[int]], mode: str = "fp32", directory: str | os.PathLike | None = None):
        if mode not in MODES:
            raise ValueError(f"estimators={mode!r}; choose one of {', '.join(MODES)}")
        if mode == "disk" and directory is None:
            raise ValueError("--estimators disk needs a directory (--checkpoint-dir)")
        self.mode = mode
        self.shapes = [tuple(int(s) for s in shape) for shape in shapes]
        self.dir = Path(directory) / "estimators" if directory is not None else None
        self._data: dict[int, list[torch.Tensor]] = {}
        self._maps: dict[int, list[np.memmap]] = {}
        if mode == "disk":
            self.dir.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- storage
    def _store(self, j: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.mode == "fp32":
            return [t.detach().to(torch.float32).clone() for t in tensors]
        if self.mode == "bf16":
            return [t.detach().to(torch.bfloat16).clone() for t in tensors]
        out, maps = [], []
        for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
            n = max(1, int(np.prod(shape)) if shape else 1)
            mm = np.memmap(self.dir / f"client-{j}-layer-{i}.f32", dtype=np.float32, mode="w+", shape=(n,))
            view = torch.from_numpy(mm)[: int(np.prod(shape)) if shape else 1].view(shape)
            view.copy_(t.detach().to(torch.float32))
            out.append(view)
            maps.append(mm)
        self._maps[j] = maps
        return out

    def __setitem__(self, j: int, tensors: Sequence[torch.Tensor]) -> None:
        j = int(j)
        if self.mode == "disk" and j in self._data:  # write into the existing files (never remap them)
            for view, t in zip(self._data[j], tensors):
                view.copy_(t.detach().to(torch.float32))
            return
        self._drop(j)
        self._data[j] = self._store(j, tensors)

    def adopt(self, j: int, tensors: list[torch.Tensor]) -> None:
        """Store client j's estimator from tensors nobody else uses (the round's decoded R_j): fp32
        keeps contiguous float32 tensors as they are instead of copying them (one model copy less
        while a round is applied); the other modes store them as `store[j] = tensors` does."""
        if self.mode != "fp32":
            self[j] = tensors
            return
        self._drop(j)
        self._data[int(j)] = [t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).clone()
                              for t in (x.detach() for x in tensors)]

    def __getitem__(self, j: int) -> list[torch.Tensor]:
        return self._data[j]

    def __delitem__(self, j: int) -> None:
        self._drop(j)
        del self._data[j]

    def _drop(self, j: int) -> None:
        for mm in self._maps.pop(j, []):
            try:
                mm._mmap.close()  # noqa: SLF001 - numpy has no public close
            except Exception:  # noqa: BLE001
                pass

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    # -------------------------------------------------------------- views
    def float32(self, j: int) -> list[torch.Tensor] | None:
        """Client j's estimator as float32 copies (None when the server has none)."""
        est = self._data.get(j)
        return None if est is None else [t.to(torch.float32).clone() for t in est]

    def as_float32_dict(self) -> dict[int, list[torch.Tensor]]:
        """Every estimator as float32 (for checkpoints: the format stores them as the model's dtype)."""
        if self.mode != "bf16":
            return dict(self._data)
        return {j: [t.to(torch.float32) for t in est] for j, est in self._data.items()}

    def nbytes(self) -> int:
        """Bytes the estimators occupy (in memory for fp32/bf16, on disk for disk)."""
        return sum(t.numel() * t.element_size() for est in self._data.values() for t in est)

    def flush(self) -> None:
        for maps in self._maps.values():
            for mm in maps:
                mm.flush()

"""Worker checkpoints: W, M_j, G_j and the submission in flight, saved every round, so that a
restarted worker resumes exactly (`efmuon worker --checkpoint-dir`).

The files are `common.checkpoint`'s worker checkpoints; the submission travels in their extras (its
frames as one uint8 tensor "frames", their lengths and the round's training loss in the manifest).
A worker without one is re-synced by the server instead (W and G_j; the momentum restarts as M_j := G_j).
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from ..common.algorithm import WorkerState
from ..common.checkpoint import latest_checkpoint, load_worker, restore_worker, save_worker
from .connection import WorkerError

if TYPE_CHECKING:
    from ..common.config import RunConfig

log = logging.getLogger("efmuon.worker")

Pending = tuple[int, list[bytes], float]  # (round, frames, training loss) of a submission not yet acknowledged


class WorkerCheckpoints:
    """The checkpoints of one worker in `directory` (None: the worker keeps none).

    `saved` is a checkpoint read at start, (tensors, manifest), until the Join that follows it
    consumed it (`discard`)."""

    def __init__(self, directory: str | None):
        self.directory = directory
        self.saved: tuple[dict[str, torch.Tensor], dict] | None = None

    def resume_from(self, client_id: int | None) -> tuple[int, int] | None:
        """(client id, round) of the checkpoint to resume from, read the first time; None without one.

        The checkpoint of another client than `client_id` (when given) is an error."""
        if self.directory and self.saved is None and latest_checkpoint(self.directory) is not None:
            self.saved = load_worker(self.directory)
            log.info("found a worker checkpoint of round %d in %s", self.saved[1]["round"], self.directory)
        if self.saved is None:
            return None
        m = self.saved[1]
        if client_id is not None and m["client_id"] != client_id:
            raise WorkerError(f"the checkpoint in {self.directory} belongs to client "
                              f"{m['client_id']}, this worker is client {client_id}")
        return int(m["client_id"]), int(m["round"])

    def restore(self, params, specs, cfg: RunConfig, client_id: int,
                device: torch.device) -> tuple[WorkerState, Pending]:
        """The saved WorkerState and its pending submission."""
        tensors, m = self.saved
        state = WorkerState(list(params), specs, cfg, client_id, device=device)
        restore_worker(state, self.saved)
        extra = m.get("extra") or {}
        lengths = list(extra.get("frame_lengths") or [])
        blob = tensors.get("extra/frames")
        raw = blob.numpy().tobytes() if blob is not None else b""
        if sum(lengths) != len(raw):
            raise WorkerError(f"the worker checkpoint {m.get('path')} has damaged submission frames")
        frames, pos = [], 0
        for n in lengths:
            frames.append(raw[pos:pos + n])
            pos += n
        loss = extra.get("train_loss")
        log.warning("client %d resumed from its checkpoint %s (round %d)", client_id, m.get("path"), m["round"])
        return state, (int(m["round"]), frames, math.nan if loss is None else float(loss))

    def discard(self) -> None:
        self.saved = None

    def save(self, state: WorkerState, client_id: int, pending: Pending) -> None:
        """Checkpoint `state` with its `pending` submission (the last two are kept)."""
        if not self.directory:
            return
        k, frames, loss = pending
        blob = b"".join(bytes(f) for f in frames)
        save_worker(self.directory, state, client_id,
                    extra={"frame_lengths": [len(f) for f in frames], "train_loss": loss if math.isfinite(loss) else None},
                    extra_tensors={"frames": torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob
                                   else torch.zeros(0, dtype=torch.uint8)}, keep=2)

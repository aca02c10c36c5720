"""The pipelined round on the server (`--pipeline`, docs/design.md §5): uplink frames decoded as they arrive
and the step taken LMO unit by unit while the rest of the round still streams in (common.pipeline).

`Pipelining` is one part of the `Coordinator` (a mixin). For a round k with 1 <= k < rounds of a run the
pipeline can step (common.pipeline.unsupported: not MuonMax/MoMo/AdamW/ef14/a shard; not a cohort run),
the servicer hands each frame the Reassembler completes to a `FrameSink`, which queues its decode on the
compute thread (`PipelinedStep.add_frame`: decode, check, and the step of every LMO unit the frame
completes, into temporaries). The submission is accepted as today once its frames are all decoded; a bad
frame refuses it (INVALID_ARGUMENT) and `discard` forgets its frames and every unit computed with them.
When the round is processed, `pipeline_takes` decides: the pipeline commits (`PipelinedStep.commit`: X, W,
G, the estimators, the downlink's frames) if it holds exactly the round's accepted submissions from every
client; otherwise (a partial round at the deadline, a stale second stream) it is dropped and the round
runs the sequential path on the same decoded uplinks (`apply_decoded`, `step`) - the same bits either way.

Events (`Coordinator.events`): ("frame", k, t, t) when an uplink frame of round k is complete (on the loop),
and ("lmo_unit", k, t0, t1) for each unit's step (its times on the compute thread, reported at the commit).
"""
from __future__ import annotations

import asyncio
import logging
import time

from ..common.pipeline import PipelinedStep, unsupported

log = logging.getLogger("efmuon.server")


class FrameSink:
    """One submission's frames into the round's PipelinedStep: `sink(i, frame)` queues frame i's decode on
    the compute thread (in arrival order: the executor has one thread); `finish` awaits them all."""

    def __init__(self, c, pipe: PipelinedStep, j: int, round_: int):
        self.c, self.pipe, self.j, self.round = c, pipe, j, round_
        self.loop = asyncio.get_running_loop()
        self.futs: list[asyncio.Future] = []

    def __call__(self, i: int, frame) -> None:
        if self.c.events is not None:
            t = time.perf_counter()
            self.c.events("frame", self.round, t, t)
        for f in self.futs[-4:]:  # a frame already refused ends the stream now, not after its last chunk
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()
        self.futs.append(self.loop.run_in_executor(self.c.executor, self.pipe.add_frame, self.j, i, frame, self))

    async def finish(self) -> tuple[list, int]:
        """(R_j, zeroed) once every frame is decoded; FrameError/ProtocolError as `decode_uplink` raises."""
        await asyncio.gather(*self.futs)
        return await self.c._run(self.pipe.decoded, self.j)

    async def abort(self) -> None:
        """The submission is not taken: wait for its queued decodes, then forget its frames (only this
        stream's: a newer stream of the client may have sent some meanwhile)."""
        await asyncio.gather(*self.futs, return_exceptions=True)
        await self.c._run(self.pipe.discard, self.j, self)


class Pipelining:
    """The pipelined round (part of `Coordinator`, see the module docstring)."""

    def _init_pipeline(self) -> None:
        self.pipeline_off = None if self.opts.pipeline else "not asked for (--pipeline)"
        if self.opts.pipeline:
            why = "cohort rounds draw their clients per round" if self.cohorts else unsupported(self.cfg, self.state)
            if why is not None:
                log.warning("--pipeline: this run's rounds stay sequential: %s", why)
                self.pipeline_off = why
        self._pipe: PipelinedStep | None = None
        self._commit: PipelinedStep | None = None

    def pipeline_for(self, round_: int) -> PipelinedStep | None:
        """The PipelinedStep that takes round `round_`'s frames (made on first use); None: the sequential path."""
        if self.pipeline_off or not 1 <= round_ < self.rounds or round_ != self.collecting \
                or self.state.round != round_ or self._processing >= round_:
            return None
        if self._pipe is None or self._pipe.k != round_ + 1:
            self._pipe = PipelinedStep(self.state, range(self.n))
        return self._pipe

    def frame_sink(self, pipe: PipelinedStep, j: int, round_: int) -> FrameSink:
        return FrameSink(self, pipe, j, round_)

    def pipeline_takes(self, k: int, present: list[int], missing: list[int], decoded: dict) -> bool:
        """Round k is processed: True when the pipeline will commit it (the step then applies G too), False
        when the round takes the sequential path (the pipeline, if any, is dropped)."""
        pipe, self._pipe = self._pipe, None
        self._commit = None
        if pipe is None or pipe.k != k + 1 or missing or present != pipe.clients or not pipe.complete():
            return False
        for j in present:  # exactly the accepted submissions' tensors (not a second stream's)
            got = decoded.get(j)
            if got is None or len(got) != len(pipe.R[j]) or any(a is not b for a, b in zip(got, pipe.R[j])):
                return False
        self._commit = pipe
        return True

    def take_step(self) -> list[bytes]:
        """The step of the round being processed (compute thread): the pipeline's commit, or `step`."""
        pipe, self._commit = self._commit, None
        if pipe is None:
            return self.state.step()
        frames = pipe.commit()
        self._unit_times = pipe.unit_times
        return frames

    def report_units(self, k: int) -> None:
        """("lmo_unit", k, t0, t1) for each unit the pipeline stepped in round k (on the loop)."""
        times, self._unit_times = getattr(self, "_unit_times", None), None
        if times and self.events is not None:
            for t0, t1 in times:
                self.events("lmo_unit", k, t0, t1)

"""The synchronous round barrier: which round a submission belongs to, taking a new one in, the
round deadline, and the reply each submission gets.

`RoundBarrier` is one part of the `Coordinator` (a mixin): it owns the round being collected
(`collecting`, `submitted`, the pending decoded uplinks, the result futures, the deadline) and
`last_applied` / `last_plan`; it hands a complete round to the Coordinator's `_process`.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..common.errors import FrameError
from ..common.wire import protocol
from .errors import Rejected
from .plan import Plan

if TYPE_CHECKING:
    from ..v1 import service_pb2 as pb
    from .sessions import Session

log = logging.getLogger("efmuon.server")


class SubmissionKind(str, enum.Enum):
    """What a submission is, relative to the round being collected (`RoundBarrier.classify`)."""

    NEW = "new"  # the client's first submission of the round being collected: it is applied
    PENDING = "pending"  # a duplicate of the round being collected: it waits for that round's reply
    LAST = "last"  # a duplicate of the last applied round: it gets that reply again
    RESYNC = "resync"  # an older round, or one that closed without this client: it must re-join
    LATE = "late"  # cohort runs: a round that closed without this member (a straggler): not applied


class Phase(str, enum.Enum):
    """What the server is doing now (`StatusReply.phase` carries the value)."""

    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    STEPPING = "stepping"
    CHECKPOINTING = "checkpointing"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPING = "stopping"


class RoundBarrier:
    """The round barrier (part of `Coordinator`, see the module docstring)."""

    def _init_barrier(self) -> None:
        self.collecting = 0  # the round being collected (0 = the initial submission)
        self.submitted: set[int] = set()
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.pending_zeroed: dict[int, int] = {}
        self.train_losses: dict[int, float] = {}
        self.results: dict[int, asyncio.Future] = {}
        self.last_applied: dict[int, int] = {}  # client -> the last round whose submission was applied
        self.last_plan: Plan | None = None
        self._started: tuple[int, set[int]] = (-1, set())  # (round, clients that began submitting it)
        self._processing = -1  # the highest round whose processing started
        self._deadline_task: asyncio.Task | None = None

    def _result(self, round_: int) -> asyncio.Future:
        fut = self.results.get(round_)
        if fut is None:
            fut = self.results[round_] = asyncio.get_running_loop().create_future()
        return fut

    def classify(self, s: Session, round_: int) -> SubmissionKind:
        """NEW, PENDING (duplicate of the round being collected), LAST (duplicate of the last applied
        round) or RESYNC (an older round, or one that closed without this client). A round from the
        future is refused."""
        if self.failed is not None:
            raise Rejected("ABORTED", f"the run was aborted: {self.failed}")
        if self.stopping:
            raise self._stopping_error()
        if round_ > self.collecting or (round_ == self.collecting and self.collecting > self.rounds):
            raise Rejected("FAILED_PRECONDITION", f"round {round_} is not open: the server is collecting round "
                           f"{self.collecting} (0 = the initial submission, the run has {self.rounds} rounds)")
        if round_ == self.collecting:
            if s.client_id in self.submitted:
                return SubmissionKind.PENDING
            # the round is already closing without this client (the deadline passed, --on-deadline proceed)
            if self._processing >= round_:
                return self._closed_without(s.client_id)
            return SubmissionKind.NEW
        if self.cohorts:  # any earlier round: applied (a duplicate) or closed without it
            return SubmissionKind.LAST if self.last_applied.get(s.client_id) == round_ else \
                self._closed_without(s.client_id)
        if round_ == self.collecting - 1 and self.last_applied.get(s.client_id) == round_:
            return SubmissionKind.LAST
        return SubmissionKind.RESYNC

    def _closed_without(self, j: int) -> SubmissionKind:
        """A submission of a round that closed without client j: a member's is late (cohort runs: it
        restores its state, server.cohorts), anything else must re-sync."""
        return SubmissionKind.LATE if self.cohorts and j in self.members else SubmissionKind.RESYNC

    def expected_frames(self, round_: int) -> tuple[int, ...]:
        if round_ == 0 and self.cfg.init == "zero":
            return (0,)
        return (len(self.model.specs),)

    def check_wire_report(self, round_: int | None, report: pb.WireReport | None, j: int) -> None:
        """Client j's WireReport, sent with its Exchange of `round_` (None: with Leave). Refused with
        INVALID_ARGUMENT when it is of no earlier call, or counts more than the client's connection
        could have carried: twice what the server counted for it since its last accepted report (wire
        bytes; message bytes where the server cannot count) plus one call the server did not see (cut
        off with a broken connection, or sent to this server before a restart). Else it is compared
        with the server's own count when it is recorded (`ByteLedger.hold`). Changes nothing when it
        refuses."""
        if report is None:
            return
        where = "Leave" if round_ is None else f"round {round_}"
        if round_ is None:
            if not -1 <= report.exchange <= self.rounds:
                raise Rejected("INVALID_ARGUMENT", f"Leave: the WireReport is of exchange {report.exchange}; it must "
                               f"be of a call of this run (-1 = the join phase .. {self.rounds})")
        elif not -1 <= report.exchange < round_ or (round_ == 0 and report.exchange != -1):
            raise Rejected("INVALID_ARGUMENT", f"round {round_}: the WireReport is of exchange {report.exchange}; "
                           f"it must be of an earlier call (-1 = the join phase .. {round_ - 1})")
        seen = self.ledger.seen_since(j)
        lost = 2 * self.frame_limit + protocol.CHUNK_BYTES
        if report.up > 2 * seen.up + lost or report.down > 2 * seen.down + lost:
            what = "counted" if self.ledger.wire_source == "server" else "sent as messages"
            raise Rejected("INVALID_ARGUMENT", f"{where}: the WireReport counts are implausible (up {report.up}, "
                           f"down {report.down}): more than client {j}'s connection could have carried; the server "
                           f"{what} {seen.up} B up and {seen.down} B down since its last report, and a report may "
                           f"exceed twice that by one call it did not see, at most {lost} B")
        self.ledger.hold(j, seen)

    def release_last_reply(self, s: Session, round_: int) -> None:
        """Client j starts a new submission of the round being collected: once every client has done
        so, each holds S_{round} (it applied the last reply, or re-synced), so the last reply's chunks
        are freed before this submission is reassembled and decoded (a stray duplicate of the previous
        round is then told to re-sync). Clients skipped by a partial round re-sync anyway (classify)."""
        plan = self.last_plan
        if self.cohorts or plan is None or plan.released or round_ != self.collecting or plan.round != round_:
            return
        # counted when a submission starts, not when it was accepted: the clients stream at the same
        # time, so waiting for n-1 accepted ones would keep the chunks alive until the step (1 model copy)
        if self._started[0] != round_:
            self._started = (round_, set())
        self._started[1].add(s.client_id)
        if len(self._started[1] | self.submitted) == self.n:
            plan.release()

    async def accept(self, s: Session, round_: int, frames: Sequence | None, train_loss: float,
                     previous: pb.WireReport | None, payload: int, message: int,
                     decoded: tuple[list[torch.Tensor], int] | None = None) -> SubmissionKind:
        """Decode and store a new submission; start the round when it is the n-th. Returns the
        classification at storing time (NEW, or another kind when the state moved meanwhile).
        `decoded`: (R_j, zeroed) already decoded frame by frame (--pipeline) instead of `frames`."""
        j = s.client_id
        decoded, zeroed = decoded if decoded is not None else ([], 0)
        if frames:
            owned = isinstance(frames, list)
            t0 = time.perf_counter()
            try:
                decoded, zeroed = await self._run(self.state.decode_uplink, j, frames if owned else list(frames),
                                                  round_ == 0, owned)
                if self.events is not None:
                    self.events("decode", round_, t0, time.perf_counter())
            except FrameError as exc:
                raise Rejected("INVALID_ARGUMENT", f"client {j} round {round_}: {exc}; nothing was applied, resend a "
                               "valid submission") from None
            finally:
                if owned:  # the caller's reassembled buffer: free it now, not after the round
                    frames.clear()
        if self.sessions.get(j) is not s:
            raise Rejected("FAILED_PRECONDITION", f"client {j} re-joined while this submission was read; Join again")
        kind = self.classify(s, round_)  # re-check: the decode awaited
        if kind != SubmissionKind.NEW:
            return kind
        self._store(j, round_, decoded, zeroed, train_loss)
        if self.cohorts and round_ >= 1:
            self.round_times.append(time.monotonic() - self.round_opened)
        self.ledger.record(round_, j, "up", "payload", payload)
        self.ledger.record(round_, j, "up", "message", message)
        self.ledger.record_client_report(j, previous)
        self._result(round_)
        if self.round_complete():
            self._start_processing(round_)
        return SubmissionKind.NEW

    async def accept_init(self, s: Session, round_: int, frames: Sequence, train_loss: float) -> SubmissionKind:
        """Cohort runs: the initial submission of a client registering after round 0 (decoded like round 0's,
        applied between two rounds: `Coordinator._process`). NEW, or LATE/RESYNC when it came too late."""
        j = s.client_id
        decoded = None
        if frames:
            owned = isinstance(frames, list)
            try:
                decoded, _ = await self._run(self.state.decode_uplink, j, frames if owned else list(frames), True,
                                             owned)
            except FrameError as exc:
                raise Rejected("INVALID_ARGUMENT", f"client {j} initial submission: {exc}; nothing was applied, "
                               "resend a valid one") from None
            finally:
                if owned:
                    frames.clear()
        elif self.cfg.init == "grad":
            raise Rejected("INVALID_ARGUMENT", f"client {j}: the run's init is 'grad': the initial submission "
                           "carries the gradient at the W of the Join reply (raw float32 frames)")
        if self.sessions.get(j) is not s:
            raise Rejected("FAILED_PRECONDITION", f"client {j} re-joined while this submission was read; Join again")
        if j in self.members:
            return SubmissionKind.LAST
        self.registrations[j] = decoded
        return SubmissionKind.NEW

    def _store(self, j: int, round_: int, decoded: list[torch.Tensor], zeroed: int, train_loss: float) -> None:
        self.submitted.add(j)
        if decoded:
            self.pending[j] = decoded
        if zeroed:
            self.pending_zeroed[j] = zeroed
            log.warning("client %d round %d: %d non-finite value(s) replaced by 0 (--nan-policy zero)",
                        j, round_, zeroed)
        if math.isfinite(train_loss):
            self.train_losses[j] = float(train_loss)

    async def result(self, round_: int) -> Plan:
        return await asyncio.shield(self._result(round_))

    def reply_for(self, kind: SubmissionKind, round_: int) -> Plan | None:
        """The reply to a duplicate; None: tell the client to re-sync (the last reply was freed)."""
        if kind == SubmissionKind.LAST and self.last_plan is not None:
            return None if self.last_plan.released else self.last_plan
        return Plan(round_ + 1, round_ >= self.rounds, [])

    # ------------------------------------------------------------------ closing a round
    def _start_processing(self, k: int, missing: Sequence[int] = ()) -> None:
        if self._processing >= k:
            return
        self._processing = k
        if self._deadline_task is not None:
            self._deadline_task.cancel()
            self._deadline_task = None
        self._spawn(self._process(k, list(missing)))

    def _arm_deadline(self, k: int) -> None:
        if self._deadline_task is not None:
            self._deadline_task.cancel()
            self._deadline_task = None
        seconds = self.opts.round_deadline
        self.round_opened = time.monotonic()
        if self.cohorts and k >= 1:
            self.round_deadline_used = self.deadlines.current()
            if self.round_deadline_used is not None:  # stragglers: the round closes this long after it opened
                seconds = float(self.round_deadline_used)
        if seconds is not None and k <= self.rounds:
            self._deadline_task = self._spawn(self._deadline(k, seconds))

    async def _deadline(self, k: int, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self.collecting != k or self._processing >= k or self.failed is not None or self.stopping:
            return
        self._deadline_task = None
        expected = self.cohort if self.cohorts else set(range(self.n))
        missing = sorted(expected - self.submitted)
        if self.cohorts and k >= 1 and self.round_deadline_used is not None:  # stragglers, as simulate drops them
            log.info("round %d: client(s) %s missed the %g s deadline: dropped from the round", k, missing, seconds)
            self._start_processing(k, missing)
            return
        notes = self.absence_notes(missing)
        what = (f"round {k}: client(s) {', '.join(map(str, missing))} did not submit within the round deadline "
                f"of {seconds:g} s (--round-deadline): {'; '.join(notes)}")
        proceed = self.opts.on_deadline == "proceed" or (self.cohorts and k == 0)  # a federation starts with those there
        if proceed and self.submitted:
            log.warning("%s; proceeding with the %d client(s) present (--on-deadline proceed)", what,
                        len(self.submitted))
            self.partial_rounds += 1
            self._start_processing(k, missing)
        else:
            self.abort(what + ("" if self.opts.on_deadline == "fail" else "; no client submitted at all"))

    def _take_round(self) -> tuple[list[int], dict[int, list[torch.Tensor]], dict[int, int], dict[int, float]]:
        """The round's clients, decoded uplinks, zeroed counts and training losses; the barrier keeps none."""
        present = sorted(self.submitted)
        decoded, self.pending = self.pending, {}
        zeroed, self.pending_zeroed = self.pending_zeroed, {}
        losses, self.train_losses = self.train_losses, {}
        return present, decoded, zeroed, losses

    def _close_round(self, k: int, plan: Plan) -> None:
        """Round k is applied and `plan` answers it: the barrier moves on to round k + 1."""
        self.last_plan = plan
        self.collecting, self.submitted = k + 1, set()

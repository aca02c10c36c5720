"""TODO docstring"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
import types
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..common.algorithm import ServerState, params_sha256
from ..common.checkpoint import restore_server, save_server
from ..common.compress import parse_spec
from ..common.config import RunConfig
from ..common.errors import ConfigError, FrameError
from ..common.outputs import write_outputs
from ..common.report import Report
from ..common.runtime import return_freed_memory, rss_bytes, trim_heap
from ..common.wire import chunking, protocol
from ..v1 import service_pb2 as pb
from .errors import Rejected, RunAborted
from .estimators import EstimatorStore
from .ledger import ByteLedger
from .model import ServerModel
from .options import LEAVE_TIMEOUT, MAX_ABS_VALUE, MAX_NAME_BYTES, ServerOptions
from .plan import Plan

log = logging.getLogger("efmuon.server")


@dataclass
class Session:
    client_id: int
    token: str
    name: str
    confirmed: bool = False  # the Join reply was streamed completely
    left: bool = False
    reason: str = ""  # why it left (Leave's reason), for the deadline's error message


class Coordinator:
    """Sessions, the round barrier and the report of one run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, model: ServerModel, device: str | torch.device = "cpu",
                 quiet: bool = False, stream=None, leave_timeout: float = LEAVE_TIMEOUT,
                 options: ServerOptions | None = None, resume=None):
        self.opts = (options or ServerOptions()).validate()
        self.cfg = cfg
        self.n, self.rounds = int(cfg.workers), int(cfg.rounds)
        if self.n > self.opts.max_clients:
            raise ConfigError(f"workers={self.n} is more than --max-clients {self.opts.max_clients}")
        self.model = model
        # before X, W and G are allocated: they and everything after come from mmap, not the heap
        return_freed_memory(sum(4 * p.numel() for p in model.params))
        self.state = ServerState(model.params, model.specs, cfg, self.n, device=device)
        self.state.estimators = EstimatorStore([s.shape for s in model.specs], self.opts.estimators,
                                               self.opts.checkpoint_dir)
        self.fingerprint = protocol.fingerprint(model.names, model.params)
        self.config_bytes = protocol.encode_config(cfg)
        self.numel = sum(p.numel() for p in model.params)
        self.frame_limit = 16 * self.numel + 4096 * len(model.params) + protocol.CHUNK_BYTES
        model.params = []  # ServerState copied them into X and W: do not keep a third copy alive
        trim_heap(4 * self.numel)  # ... nor the heap pages they (and their construction) occupied
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="efmuon-state")
        self.report = Report(cfg.to_dict(), transport=True, metrics_path=cfg.metrics, log_every=cfg.log_every,
                             total_rounds=self.rounds, stream=stream, quiet=quiet)
        self.quiet = quiet
        self.leave_timeout = leave_timeout
        self.t_start = time.monotonic()
        # sessions and the round being collected
        self.sessions: dict[int, Session] = {}
        self.last_applied: dict[int, int] = {}  # client -> the last round whose submission was applied
        self.collecting = 0
        self.submitted: set[int] = set()
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.pending_zeroed: dict[int, int] = {}
        self.train_losses: dict[int, float] = {}
        self.results: dict[int, asyncio.Future] = {}
        self.last_plan: Plan | None = None
        self._started: tuple[int, set[int]] = (-1, set())  # (round, clients that began submitting it)
        self.phase = "collecting"
        self.loss_w: float | None = None
        self.loss_x: float | None = None
        self.failed: BaseException | None = None
        self.stopping = False
        self.ledger = ByteLedger(self.report, self.rounds)
        self.initial_facts: dict = {}
        self._init_w: tuple[list[int], list[bytes]] | None = None
        self._init_lock = asyncio.Lock()
        self._lock = asyncio.Lock()  # held while a round is processed and while a Join snapshots the state
        self._processing = -1  # the highest round whose processing started
        self._deadline_task: asyncio.Task | None = None
        self._step_t0 = 0.0
        self._all_left = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.finished = asyncio.Event()
        self._summary_written = False
        # counters (Status)
        self.rejected = 0
        self.nonfinite_zeroed = 0
        self.partial_rounds = 0
        self.checkpoint_round = 0
        self.resumed_from: str | None = None
        self.state_broken = False  # a round's processing failed half-way: never checkpoint that
        if resume is not None:
            self._restore(resume)

    # ------------------------------------------------------------------ helpers
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _spawn(self, coro) -> asyncio.Task:
        """Run `coro` as a task the loop keeps (asyncio holds only weak references to tasks)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _result(self, round_: int) -> asyncio.Future:
        fut = self.results.get(round_)
        if fut is None:
            fut = self.results[round_] = asyncio.get_running_loop().create_future()
        return fut

    def check_client_id(self, client_id: int) -> None:
        if not 0 <= client_id < self.n:
            raise Rejected("INVALID_ARGUMENT", f"client id {client_id} is not valid: this run has clients "
                           f"0..{self.n - 1} (workers={self.n})")

    def session(self, client_id: int, token: str) -> Session:
        self.check_client_id(client_id)
        s = self.sessions.get(client_id)
        if s is None or not s.confirmed:
            raise Rejected("FAILED_PRECONDITION", f"client {client_id} has not joined this run; call Join first")
        if len(token) > 256 or not secrets.compare_digest(s.token.encode(), token.encode("utf-8", "replace")):
            raise Rejected("FAILED_PRECONDITION", f"the session token for client {client_id} is not the one "
                           "Join issued; another process holds this client id (or it re-joined since): Join again")
        return s

    # ------------------------------------------------------------------ join
    def join(self, client_id: int | None, version: int, parameters: Sequence[pb.ParameterInfo], name: str,
             rejoin: bool = False) -> Session:
        """Validate a Join and reserve the client id. Raises Rejected; changes nothing when it does."""
        if self.stopping:
            raise self._stopping_error()
        if len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES:
            raise Rejected("INVALID_ARGUMENT", f"client_name is {len(name.encode('utf-8', 'replace'))} bytes; "
                           f"at most {MAX_NAME_BYTES}")
        if version != protocol.PROTOCOL_VERSION:
            raise Rejected("FAILED_PRECONDITION", f"protocol version {version} is not supported: this server speaks "
                           f"efmuon.v1 protocol version {protocol.PROTOCOL_VERSION}; upgrade the worker or the server")
        if len(parameters) > len(self.fingerprint) + 1:
            raise Rejected("FAILED_PRECONDITION", f"model fingerprint mismatch: the worker announces "
                           f"{len(parameters)} parameters, the server's model has {len(self.fingerprint)}")
        why = protocol.fingerprint_mismatch(parameters, self.fingerprint)
        if why:
            raise Rejected("FAILED_PRECONDITION", f"model fingerprint mismatch: {why}; the worker must build the "
                           "same model as the server")
        if self.failed is not None:
            raise Rejected("ABORTED", f"the run was aborted: {self.failed}")
        if self.collecting > self.rounds and client_id is None:
            raise Rejected("FAILED_PRECONDITION", f"the run is finished (all {self.rounds} rounds done)")
        if client_id is None:
            if self.collecting > 0:
                raise Rejected("FAILED_PRECONDITION", f"the run is at round {self.collecting}: re-join it with "
                               "your client id (--client-id J)")
            free = [j for j in range(self.n) if j not in self.sessions]
            if not free:
                raise Rejected("RESOURCE_EXHAUSTED", f"all {self.n} client ids of this run are taken")
            client_id = free[0]
        else:
            self.check_client_id(client_id)
            old = self.sessions.get(client_id)
            if old is not None and not old.left and not rejoin:
                raise Rejected("ALREADY_EXISTS", f"client id {client_id} is already held by a live session "
                               f"({old.name or 'unnamed'}); pick another id, or set rejoin to take it over "
                               "(a restarted worker started with --client-id does)")
        live = sum(1 for j, x in self.sessions.items() if not x.left and j != client_id)
        if live >= self.opts.max_clients:
            raise Rejected("RESOURCE_EXHAUSTED", f"{live} live sessions: the server's --max-clients is "
                           f"{self.opts.max_clients}")
        old = self.sessions.get(client_id)
        s = Session(client_id, secrets.token_hex(16), name)
        self.sessions[client_id] = s
        if old is not None:
            log.warning("client %d re-joined (%s); its previous session (%s) is closed", client_id,
                        name or "unnamed", old.name or "unnamed")
        else:
            log.info("client %d joined (%s)", client_id, name or "unnamed")
        return s

    async def initial_w(self) -> tuple[list[int], list[bytes]]:
        """Frame lengths and chunks of X_0 (raw float32), built once for every client."""
        async with self._init_lock:
            if self._init_w is None:
                def build():
                    frames = protocol.raw_frames(self.state.W)
                    return [len(f) for f in frames], list(chunking.iter_chunks(frames))
                self._init_w = await self._run(build)
            return self._init_w

    async def join_payload(self, s: Session, resume_round: int | None) -> tuple[dict, list[bytes], int]:
        """What the Join reply carries: header fields, chunks and payload bytes (see JoinHeader)."""
        async with self._lock:  # never between a round's aggregate and its step
            c, j = self.collecting, s.client_id
            L = self.last_applied.get(j, -1)
            sub = j in self.submitted
            base = dict(next_round=c)
            if c > self.rounds:
                return {**base, "resync": False}, [], 0
            a = resume_round
            if a is not None and L == c - 1 and a in (c, c - 1):
                log.info("client %d resumes with its own state at round %d (server at %d)", j, a, c)
                return {**base, "resync": False}, [], 0
            if c == 0 and not sub:
                lengths, chunks = await self.initial_w()
                return {**base, "resync": True, "frame_lengths": lengths}, chunks, sum(lengths)
            ef14 = self.cfg.method == "ef14"

            def build():
                est = self.state.estimators.float32(j)
                if sub:
                    p = self.pending.get(j)
                    if p is not None:
                        est = [t.clone() for t in p] if (est is None or ef14) else [e.add_(t) for e, t in zip(est, p)]
                wf = protocol.raw_frames(self.state.W)
                ef = protocol.raw_frames(est) if est is not None else []
                return [len(f) for f in wf], [len(f) for f in ef], list(chunking.iter_chunks(wf + ef))

            wl, el, chunks = await self._run(build)
            log.info("client %d re-synced at round %d (W%s)", j, c, " and its G_j" if el else "")
            return ({**base, "resync": True, "submitted": sub, "frame_lengths": wl, "estimator_frame_lengths": el},
                    chunks, sum(wl) + sum(el))

    def confirm_join(self, s: Session, request_bytes: int, reply_bytes: int, payload: int) -> None:
        if self.sessions.get(s.client_id) is not s:
            return  # superseded while streaming
        s.confirmed = True
        k = self.collecting  # a re-join's bytes count in the round it re-joined
        self.ledger.record(k, s.client_id, "up", "message", request_bytes)
        self.ledger.record(k, s.client_id, "down", "message", reply_bytes)
        self.ledger.record(k, s.client_id, "down", "payload", payload)
        if self.collecting == 0 and self._deadline_task is None:
            self._arm_deadline(0)

    def abort_join(self, s: Session) -> None:
        if self.sessions.get(s.client_id) is s and not s.confirmed:
            del self.sessions[s.client_id]
            log.warning("client %d: the Join reply could not be delivered; the id is free again", s.client_id)

    # ------------------------------------------------------------------ rounds
    def classify(self, s: Session, round_: int) -> str:
        """'new', 'pending' (duplicate of the round being collected), 'last' (duplicate of the last
        applied round) or 'resync' (an older round, or one that closed without this client). A round
        from the future is refused."""
        if self.failed is not None:
            raise Rejected("ABORTED", f"the run was aborted: {self.failed}")
        if self.stopping:
            raise self._stopping_error()
        if round_ > self.collecting or (round_ == self.collecting and self.collecting > self.rounds):
            raise Rejected("FAILED_PRECONDITION", f"round {round_} is not open: the server is collecting round "
                           f"{self.collecting} (0 = the initial submission, the run has {self.rounds} rounds)")
        if round_ == self.collecting:
            if s.client_id in self.submitted:
                return "pending"
            # the round is already closing without this client (the deadline passed, --on-deadline proceed)
            return "resync" if self._processing >= round_ else "new"
        if round_ == self.collecting - 1 and self.last_applied.get(s.client_id) == round_:
            return "last"
        return "resync"

    def expected_frames(self, round_: int) -> tuple[int, ...]:
        if round_ == 0 and self.cfg.init == "zero":
            return (0,)
        return (len(self.model.specs),)

    def check_wire_report(self, round_: int, previous: pb.WireReport | None) -> None:
        if previous is None:
            return
        if not -1 <= previous.exchange < round_ or (round_ == 0 and previous.exchange != -1):
            raise Rejected("INVALID_ARGUMENT", f"round {round_}: the WireReport is of exchange {previous.exchange}; "
                           f"it must be of an earlier call (-1 = the join phase .. {round_ - 1})")
        if previous.up > 1 << 50 or previous.down > 1 << 50:
            raise Rejected("INVALID_ARGUMENT", f"round {round_}: the WireReport counts are implausible "
                           f"(up {previous.up}, down {previous.down})")

    def decode(self, j: int, frames: Sequence, init: bool, consume: bool = False) -> tuple[list[torch.Tensor], int]:
        """Decode and check client j's frames (on the compute thread); FrameError says what is wrong.

        Non-finite values are refused or, with nan_policy 'zero', replaced by 0 (and counted).
        `consume`: `frames` is a list this call may empty as it goes (each frame's buffer is freed as
        soon as the frame is decoded).
        """
        st = self.state
        comps = [parse_spec("identity")] * len(st.specs) if init else st.up
        if len(frames) != len(st.specs):
            raise FrameError(f"expected {len(st.specs)} layer frames, got {len(frames)}")
        out, zeroed = [], 0
        for i, (c, spec) in enumerate(zip(comps, st.specs)):
            f = frames[i]
            if consume:
                frames[i] = None
            try:
                d = c.decode(f, spec.shape, device=st.device)
                del f
            except FrameError as exc:
                raise FrameError(f"layer {spec.name}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - any decoder failure on peer bytes is the peer's
                raise FrameError(f"layer {spec.name}: the frame does not decode ({type(exc).__name__}: {exc})") from None
            if tuple(d.shape) != tuple(spec.shape) or d.dtype != torch.float32:
                raise FrameError(f"layer {spec.name}: decoded to {tuple(d.shape)} {d.dtype}, expected "
                                 f"{tuple(spec.shape)} float32")
            if not d.numel():
                out.append(d)
                continue
            # one pass (aminmax; NaN propagates through it) answers both checks for a clean frame;
            # the full isfinite pass runs only for a frame that has a NaN/Inf
            lo, hi = (float(v) for v in d.aminmax())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                finite = torch.isfinite(d)
                bad = int(finite.numel() - int(finite.sum()))
                if self.opts.nan_policy == "reject":
                    raise FrameError(f"layer {spec.name}: {bad} non-finite value(s) (NaN/Inf); the server's "
                                     "--nan-policy is reject")
                d = torch.where(finite, d, torch.zeros((), dtype=d.dtype, device=d.device))
                zeroed += bad
                lo, hi = (float(v) for v in d.aminmax())
            if max(-lo, hi) > MAX_ABS_VALUE:
                raise FrameError(f"layer {spec.name}: a value of magnitude {max(-lo, hi):.3g} is above "
                                 f"{MAX_ABS_VALUE:g}; G would overflow")
            out.append(d)
        return out, zeroed

    def release_last_reply(self, s: Session, round_: int) -> None:
        """Client j starts a new submission of the round being collected: once every client has done
        so, each holds S_{round} (it applied the last reply, or re-synced), so the last reply's chunks
        are freed before this submission is reassembled and decoded (a stray duplicate of the previous
        round is then told to re-sync). Clients skipped by a partial round re-sync anyway (classify)."""
        plan = self.last_plan
        if plan is None or plan.released or round_ != self.collecting or plan.round != round_:
            return
        # counted when a submission starts, not when it was accepted: the clients stream at the same
        # time, so waiting for n-1 accepted ones would keep the chunks alive until the step (1 model copy)
        if self._started[0] != round_:
            self._started = (round_, set())
        self._started[1].add(s.client_id)
        if len(self._started[1] | self.submitted) == self.n:
            plan.release()

    async def accept(self, s: Session, round_: int, frames: Sequence, train_loss: float,
                     previous: pb.WireReport | None, payload: int, message: int) -> str:
        """Decode and store a new submission; start the round when it is the n-th. Returns the
        classification at storing time ('new', or another kind when the state moved meanwhile)."""
        j = s.client_id
        decoded, zeroed = [], 0
        if frames:
            try:
                owned = isinstance(frames, list)
                decoded, zeroed = await self._run(self.decode, j, frames if owned else list(frames), round_ == 0,
                                                  owned)
            except FrameError as exc:
                raise Rejected("INVALID_ARGUMENT", f"client {j} round {round_}: {exc}; nothing was applied, resend a "
                               "valid submission") from None
            finally:
                if isinstance(frames, list):  # the caller's reassembled buffer: free it now, not after the round
                    frames.clear()
        if self.sessions.get(j) is not s:
            raise Rejected("FAILED_PRECONDITION", f"client {j} re-joined while this submission was read; Join again")
        kind = self.classify(s, round_)  # re-check: the decode awaited
        if kind != "new":
            return kind
        self.submitted.add(j)
        if decoded:
            self.pending[j] = decoded
        if zeroed:
            self.pending_zeroed[j] = zeroed
            log.warning("client %d round %d: %d non-finite value(s) replaced by 0 (--nan-policy zero)", j, round_, zeroed)
        if math.isfinite(train_loss):
            self.train_losses[j] = float(train_loss)
        self.ledger.record(round_, j, "up", "payload", payload)
        self.ledger.record(round_, j, "up", "message", message)
        self.ledger.record_wire(j, previous)
        self._result(round_)
        if len(self.submitted) == self.n:
            self._start_processing(round_)
        return "new"

    async def result(self, round_: int) -> Plan:
        return await asyncio.shield(self._result(round_))

    def reply_for(self, kind: str, round_: int) -> Plan | None:
        """The reply to a duplicate; None: tell the client to re-sync (the last reply was freed)."""
        if kind == "last" and self.last_plan is not None:
            return None if self.last_plan.released else self.last_plan
        return Plan(round_ + 1, round_ >= self.rounds, [])

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
        if self.opts.round_deadline is not None and k <= self.rounds:
            self._deadline_task = self._spawn(self._deadline(k, self.opts.round_deadline))

    async def _deadline(self, k: int, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self.collecting != k or self._processing >= k or self.failed is not None or self.stopping:
            return
        self._deadline_task = None
        missing = sorted(set(range(self.n)) - self.submitted)
        notes = []
        for j in missing:
            sess = self.sessions.get(j)
            if sess is None:
                notes.append(f"client {j} never joined")
            elif sess.left:
                notes.append(f"client {j} left before the last round ({sess.reason or 'no reason given'}) "
                             "and did not rejoin")
            else:
                notes.append(f"client {j} is connected but did not submit")
        what = (f"round {k}: client(s) {', '.join(map(str, missing))} did not submit within the round deadline "
                f"of {seconds:g} s (--round-deadline): {'; '.join(notes)}")
        if self.opts.on_deadline == "proceed" and self.submitted:
            log.warning("%s; proceeding with the %d client(s) present (--on-deadline proceed)", what,
                        len(self.submitted))
            self.partial_rounds += 1
            self._start_processing(k, missing)
        else:
            self.abort(what + ("" if self.opts.on_deadline == "fail" else "; no client submitted at all"))

    async def _process(self, k: int, missing: list[int]) -> None:
        """Round k's submissions are in (all n, or those present at the deadline): aggregate,
        evaluate, step, checkpoint, publish S_{k+1}."""
        fut = self._result(k)
        async with self._lock:
            present = sorted(self.submitted)
            decoded, self.pending = self.pending, {}
            zeroed, self.pending_zeroed = self.pending_zeroed, {}
            losses, self.train_losses = self.train_losses, {}
            if k == 0:
                # free the cached X_0 chunks now: a Join waits for this lock and, once round 0 is
                # processed, is answered from the state (re-sync), never from this cache
                self._init_w = None
            try:
                self.phase = "aggregating"
                if decoded:
                    await self._run(self.state.apply_decoded, decoded, True)  # consumes `decoded`
                del decoded
                for j in present:
                    self.last_applied[j] = k
                self.nonfinite_zeroed += sum(zeroed.values())
                facts: dict = {}
                if missing:
                    facts["skipped_clients"] = list(missing)
                if k >= 1:
                    facts["seconds"] = time.perf_counter() - self._step_t0
                    facts["train_loss"] = sum(losses.values()) / len(losses) if losses else None
                    facts["loss_w"] = facts.get("loss_w")
                    facts["loss_x"] = facts.get("loss_x")
                    if self.model.evaluate and (k % self.cfg.eval_every == 0 or k == self.rounds):
                        self.phase = "evaluating"
                        facts.update(await self._run(self.model.evaluate, self.state.W, self.state.X))
                        self.loss_w, self.loss_x = facts["loss_w"], facts["loss_x"]
                elif self.model.initial:
                    self.phase = "evaluating"
                    self.initial_facts = await self._run(self.model.initial, self.state.W)
                self.ledger.facts[k] = facts
                self.ledger.report_upto(k - 1)
                if k < self.rounds:
                    self.phase = "stepping"
                    self._step_t0 = time.perf_counter()
                    if not missing and self.last_plan is not None:
                        # every client submitted round k, so each has S_k: nobody can still ask for the
                        # previous reply (a stray duplicate of round k-1 gets a resync). Free its chunks
                        # before the new ones are built rather than holding both.
                        self.last_plan.release()
                    plan = await self._run(self._step_and_plan, k)
                else:
                    plan = Plan.build(k + 1, None)
                self.last_plan = plan
                self.collecting, self.submitted = k + 1, set()
                if self._checkpoint_due():
                    self.phase = "checkpointing"
                    await self.checkpoint()
                self.phase = "collecting" if k < self.rounds else "finished"
                self.results.pop(k - 1, None)
                fut.set_result(plan)
                if k == self.rounds:
                    self._spawn(self._wrap_up())
                else:
                    self._arm_deadline(k + 1)
            except BaseException as exc:  # a bug or an exhausted machine: stop the run loudly
                self.state_broken = True
                if not self.stopping:
                    log.exception("round %d failed", k)
                self.failed = RunAborted(f"the server failed in round {k}: {type(exc).__name__}: {exc}")
                self.phase = "failed"
                if not fut.done():
                    fut.set_exception(Rejected("INTERNAL", str(self.failed)))
                self.finished.set()

    def _step_and_plan(self, k: int) -> Plan:
        """The step of round k and its reply (on the compute thread)."""
        plan = Plan.build(k + 1, self.state.step())
        # the round's uplinks arrived as many small gRPC buffers (heap); freed, their pages would stay
        # resident under the next round's (mmapped) R_j: return them now (large models only)
        trim_heap(4 * self.numel)
        return plan

    def record_down(self, plan: Plan, j: int, message: int) -> None:
        """The reply `plan` (S_{plan.round}, or the final `done`) was streamed to client j."""
        k = plan.round - 1 if plan.done else plan.round
        self.ledger.record(k, j, "down", "payload", plan.payload)
        self.ledger.record(k, j, "down", "message", message)

    def leave(self, s: Session, last: pb.WireReport | None, reason: str) -> None:
        if not s.left:
            self.ledger.record_wire(s.client_id, last)
        s.left = True
        s.reason = reason[:MAX_NAME_BYTES * 4]
        if reason:
            log.warning("client %d left: %s", s.client_id, s.reason)
        else:
            log.info("client %d left", s.client_id)
        if self.collecting <= self.rounds and self.failed is None and not self.stopping:
            wait = ("" if self.opts.round_deadline is None
                    else f" until the round deadline ({self.opts.round_deadline:g} s)")
            log.warning("client %d left before the last round; waiting for it to re-join%s", s.client_id, wait)
        if all(self.sessions.get(j) is not None and self.sessions[j].left for j in range(self.n)):
            self._all_left.set()

    def abort(self, why: str) -> None:
        """End the run early: every client waiting for a round gets ABORTED with `why`."""
        log.error("aborting the run: %s", why)
        self.failed = RunAborted(why)
        self.phase = "failed"
        for fut in self.results.values():
            if not fut.done():
                fut.set_exception(Rejected("ABORTED", f"the run was aborted: {why}"))
        self.finished.set()

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_due(self) -> bool:
        if not self.opts.checkpoint_dir:
            return False
        if self.collecting > self.rounds:
            return True
        every = self.opts.checkpoint_every
        return bool(every) and self.collecting % every == 0

    def _checkpoint_payload(self) -> tuple[dict, dict, dict]:
        """(extra metadata, per-client metadata, extra tensors) of a checkpoint; loop thread only."""
        plan = self.last_plan
        led = self.ledger
        meta = {
            "collecting": self.collecting,
            "plan": None if plan is None else {"round": plan.round, "done": plan.done,
                                               "frame_lengths": [] if plan.released else list(plan.frame_lengths),
                                               **({"released": True} if plan.released else {})},
            "report": json.dumps({
                "rounds": self.report.rounds, "totals": self.report.totals, "init_bytes": self.report.init_bytes,
                "open": {str(k): {str(j): v for j, v in c.items()} for k, c in led.open.items()},
                "facts": {str(k): v for k, v in led.facts.items()}, "reported_upto": led.reported_upto,
                "client_bytes": led.client_bytes, "init_clients": led.init_clients,
                "initial_facts": self.initial_facts, "loss_w": self.loss_w, "loss_x": self.loss_x,
                "nonfinite_zeroed": self.nonfinite_zeroed, "partial_rounds": self.partial_rounds,
            }, default=float),
        }
        clients = {j: {"last_round": r} for j, r in self.last_applied.items()}
        tensors = {}
        if plan is not None and plan.chunks:
            blob = b"".join(m.chunk for m in plan.chunks)
            tensors["plan"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return meta, clients, tensors

    async def checkpoint(self) -> str | None:
        """Write a checkpoint of the state now (between rounds); returns its path."""
        if not self.opts.checkpoint_dir:
            return None

        meta, clients, tensors = self._checkpoint_payload()
        st = self.state

        def write():
            est = st.estimators
            if isinstance(est, EstimatorStore):
                est.flush()
                est = est.as_float32_dict()
            view = types.SimpleNamespace(round=st.round, cfg=st.cfg, specs=st.specs, n=st.n,
                                         stale_nuclear=st.stale_nuclear, X=st.X, W=st.W, G=st.G,
                                         estimators=est, ef14_buffer=st.ef14_buffer)
            return save_server(self.opts.checkpoint_dir, view, self.cfg, meta, clients=clients,
                               extra_tensors=tensors, keep=self.opts.checkpoint_keep)

        t0 = time.perf_counter()
        path = await self._run(write)
        self.checkpoint_round = self.collecting
        log.info("checkpoint of round %d written to %s (%.2f s)", self.collecting, path, time.perf_counter() - t0)
        return str(path)

    def _restore(self, loaded) -> None:
        """Resume from a loaded server checkpoint (`checkpoint.load_server(DIR)`)."""

        tensors, m = loaded
        extra = m.get("extra") or {}
        if "collecting" not in extra:
            raise ConfigError(f"checkpoint {m.get('path')} was not written by efmuon server (no round state)")
        st = self.state
        store = st.estimators
        restore_server(st, loaded)
        plain, st.estimators = st.estimators, store
        for j, est in plain.items():
            store[j] = est
        self.collecting = int(extra["collecting"])
        self._processing = self.collecting - 1
        self.last_applied = {int(j): int(v.get("last_round", -1)) for j, v in (m.get("clients") or {}).items()}
        p = extra.get("plan")
        if p is not None:
            frames = []
            if p["frame_lengths"]:
                blob = tensors.get("extra/plan")
                if blob is None or blob.numel() != sum(p["frame_lengths"]):
                    raise FrameError(f"checkpoint {m.get('path')}: the last downlink's frames are missing or damaged")
                raw, pos = blob.numpy().tobytes(), 0
                for n in p["frame_lengths"]:
                    frames.append(raw[pos:pos + n])
                    pos += n
            if p.get("released"):  # every client had it; its chunks were freed before the checkpoint
                self.last_plan = Plan(int(p["round"]), bool(p["done"]), [], released=True)
            else:
                self.last_plan = Plan.build(int(p["round"]), None if p["done"] else frames)
        r = json.loads(extra.get("report") or "{}")
        rep, led = self.report, self.ledger
        rep.rounds = r.get("rounds", [])
        rep.totals = r.get("totals", rep.totals)
        rep.init_bytes = r.get("init_bytes", rep.init_bytes)
        led.open = {int(k): {int(j): v for j, v in c.items()} for k, c in r.get("open", {}).items()}
        led.facts = {int(k): v for k, v in r.get("facts", {}).items()}
        led.reported_upto = int(r.get("reported_upto", -1))
        led.client_bytes = r.get("client_bytes", {})
        led.init_clients = r.get("init_clients", {})
        self.initial_facts = r.get("initial_facts", {})
        self.loss_w, self.loss_x = r.get("loss_w"), r.get("loss_x")
        self.nonfinite_zeroed = int(r.get("nonfinite_zeroed", 0))
        self.partial_rounds = int(r.get("partial_rounds", 0))
        self.checkpoint_round = self.collecting
        self.resumed_from = m.get("path")
        self.phase = "collecting" if self.collecting <= self.rounds else "finished"
        log.warning("resumed from %s: round %d of %d", m.get("path"), self.collecting, self.rounds)

    def start(self) -> None:
        """Called once the server listens: arm the deadline of a resumed run's open round."""
        if self.collecting > 0 and self.collecting <= self.rounds:
            self._arm_deadline(self.collecting)
        elif self.collecting > self.rounds and not self._summary_written:
            self._all_left.set()  # resumed after the last round: nobody is left to wait for
            self._spawn(self._wrap_up())

    # ------------------------------------------------------------------ report
    async def _wrap_up(self) -> None:
        try:
            await asyncio.wait_for(self._all_left.wait(), timeout=self.leave_timeout)
        except asyncio.TimeoutError:
            missing = [j for j in range(self.n) if j not in self.sessions or not self.sessions[j].left]
            log.warning("clients %s did not Leave within %.0f s; their last wire figures are missing",
                        missing, self.leave_timeout)
        await self.write_summary()
        self.finished.set()

    async def write_summary(self, partial: bool = False) -> dict:
        """Finish the report (also after an interrupted run, with partial=True) and write it."""
        if self._summary_written:
            return self.report.summary
        self._summary_written = True
        if not partial:
            self.ledger.report_upto(self.rounds)
        W, X, n, full = self.state.W, self.state.X, self.n, 4 * self.numel

        def compute() -> dict:
            extra = self.model.final(W, X) if (self.model.final and not partial) else {}
            return {**extra, "w_sha256": params_sha256(W, self.model.names),
                    "x_sha256": params_sha256(X, self.model.names)}

        extra = await self._run(compute)
        rounds = self.rounds if not partial else max(0, self.ledger.reported_upto)
        resilience = {"nonfinite_zeroed": self.nonfinite_zeroed, "partial_rounds": self.partial_rounds,
                      "rejected_requests": self.rejected}
        if self.resumed_from:
            resilience["resumed_from"] = self.resumed_from
        summary = self.report.finish(
            **self.initial_facts,
            **{k: extra.get(k) for k in ("eval_loss_w", "eval_loss_x", "f_star")},
            uncompressed_bytes={"up": n * full * (rounds + (1 if self.cfg.init == "grad" else 0)),
                                "down": n * full * (rounds + 1)},
            w_sha256=extra["w_sha256"], x_sha256=extra["x_sha256"], parameters=self.numel, workers=n,
            client_bytes=self.ledger.client_bytes, init_clients=self.ledger.init_clients,
            resilience=resilience,
            **({"partial": True} if partial else {}),
        )
        if not self.quiet:
            self.report.print_summary()
        if self.cfg.report or self.cfg.plots:

            await self._run(write_outputs, self.report, self.cfg, self.quiet, self.report.stream)
        return summary

    async def stop(self) -> None:
        """Interrupted: checkpoint (between rounds) and write what we have (a partial report)."""
        self.stopping = True
        self.phase = "stopping"
        if self._deadline_task is not None:
            self._deadline_task.cancel()
        if self.opts.checkpoint_dir and not self.state_broken and self.checkpoint_round != self.collecting:
            async def locked():
                async with self._lock:  # not in the middle of a round's processing
                    if not self.state_broken:
                        await self.checkpoint()
            try:
                await asyncio.wait_for(locked(), 60)
            except Exception:  # noqa: BLE001 - a failed shutdown checkpoint must not hide the report
                log.exception("the shutdown checkpoint failed")
        err = self._stopping_error()
        for fut in self.results.values():  # clients waiting for a round: resumable or over
            if not fut.done():
                fut.set_exception(err)
        if not self._summary_written:
            await self.write_summary(partial=True)
        self.finished.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _stopping_error(self) -> Rejected:
        """What clients hear while the server stops: UNAVAILABLE (reconnect: it can be resumed from its
        checkpoint) or ABORTED (the run is over)."""
        if self.opts.checkpoint_dir and self.checkpoint_round == self.collecting and not self.state_broken:
            return Rejected("UNAVAILABLE", f"the server is stopping; it checkpointed round {self.collecting} to "
                            f"{self.opts.checkpoint_dir} and can be resumed (efmuon server --resume DIR): reconnect")
        return Rejected("ABORTED", "the server was stopped before the run finished and cannot be resumed "
                        "(no --checkpoint-dir): the run is over")

    # ------------------------------------------------------------------ status
    def status(self) -> pb.StatusReply:
        if self.stopping or self.failed is not None:
            state = pb.StatusReply.STATE_STOPPING
        elif self.collecting > self.rounds:
            state = pb.StatusReply.STATE_FINISHED
        elif self.collecting == 0:
            state = pb.StatusReply.STATE_WAITING
        else:
            state = pb.StatusReply.STATE_RUNNING
        reply = pb.StatusReply(
            state=state, protocol_version=protocol.PROTOCOL_VERSION, round=self.collecting, rounds=self.rounds,
            workers=self.n, joined=sorted(j for j, s in self.sessions.items() if s.confirmed and not s.left),
            submitted=sorted(self.submitted), phase=self.phase, config=self.config_bytes,
            parameters=self.fingerprint, uptime_seconds=time.monotonic() - self.t_start,
            rejected=self.rejected, nonfinite_zeroed=self.nonfinite_zeroed, checkpoint_round=self.checkpoint_round,
            rss_bytes=rss_bytes(), partial_rounds=self.partial_rounds)
        if self.loss_w is not None:
            reply.loss_w = self.loss_w
        if self.loss_x is not None:
            reply.loss_x = self.loss_x
        return reply

    def state_sha256(self) -> str:
        """sha256 over X, W, G and every estimator (for tests: did a request change the state?)."""
        import hashlib

        h = hashlib.sha256()
        for group in (self.state.X, self.state.W, self.state.G):
            for t in group:
                h.update(t.detach().contiguous().cpu().numpy().tobytes())
        for j in sorted(self.state.estimators or {}):
            for t in self.state.estimators[j]:
                h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

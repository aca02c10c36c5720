"""The server's round logic: sessions, the synchronous barrier, and the report. No gRPC here.

`Coordinator` owns a `ServerState` (X, W, G of DESIGN.md section 1) and turns the clients'
calls into the core's round, exactly in the order `efmuon simulate` uses:

    round 0   all n initial submissions in  ->  aggregate(init=True)            (init = 'grad')
    round k   all n submissions of k in     ->  aggregate; evaluate loss at W and X; step()
              step() returns the frames of S_{k+1} once; the same bytes go to every client
    after R   a `done` reply; wait for every client's Leave (it carries the last wire figures),
              then write the report.

Everything that touches tensors (decoding, aggregate, evaluation, step, chunking) runs on one
worker thread (`loop.run_in_executor`), so the event loop keeps answering Status and
accepting submissions while a round is computed, and the state is only ever touched by one
thread at a time. Uplinks are decoded as they arrive (one client at a time; a bad frame is
refused with INVALID_ARGUMENT and nothing changes) and applied together, sorted by client id, so
the sum is the same as `ServerState.aggregate` computes.

Resilience (README "Resilience"):
  - a client id can be re-joined (`rejoin`): a restarted worker takes over its id; the server
    either keeps the worker's own state (it sent a consistent `resume_round`) or re-syncs it
    (W and the server's copy of its G_j; the worker sets M_j := G_j);
  - every round has a deadline (`ServerOptions.round_deadline`, counted from the moment the round
    opened); a client that left or crashed is waited for until then, and then the run fails
    (`on_deadline='fail'`, ABORTED for everyone with the missing clients named) or the round
    proceeds with the clients present (`'proceed'`): G += (1/n) sum over those present, so G is
    still the mean of all n estimators; a skipped client is told to re-sync when it comes back;
  - the server checkpoints (X, W, G, every G_j, each client's last applied round, the last
    downlink's frames, the report so far, RNG states, the config) every `checkpoint_every` rounds
    and at the end / at shutdown, before the round's reply is released, so a worker never holds a
    downlink that a restarted server does not know.

Bytes are recorded per (round, client, direction, level) in a `ByteLedger`. The client's wire
figures arrive one call late (`WireReport`), so round k enters the report when round k+1's
submissions (or the Leaves, for the last round) are in.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import time
import types
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from efmuon.common.algorithm import ServerState, params_sha256
from efmuon.common.compress import parse_spec
from efmuon.common.config import RunConfig
from efmuon.common.errors import ConfigError, EfmuonError, FrameError, ProtocolError
from efmuon.common.lmo import LayerSpec
from efmuon.common.report import Report
from efmuon.server import protocol
from efmuon.server.estimators import MODES as ESTIMATOR_MODES
from efmuon.server.estimators import EstimatorStore
from efmuon.server.ledger import ByteLedger
from efmuon.v1 import service_pb2 as pb

log = logging.getLogger("efmuon.server")

LEAVE_TIMEOUT = 30.0  # seconds to wait for the clients' Leave after the last round
MAX_ABS_VALUE = 1e30  # an uplink entry larger than this is refused: G would overflow float32
MAX_NAME_BYTES = 256
ON_DEADLINE = ("fail", "proceed")
NAN_POLICIES = ("reject", "zero")


@dataclass
class ServerOptions:
    """How the server behaves around the algorithm (not part of the run configuration)."""

    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # rounds between checkpoints; 0: only at the end and at shutdown
    checkpoint_keep: int = 3
    round_deadline: float | None = 600.0  # seconds a round waits for every client; None: forever
    on_deadline: str = "fail"  # fail | proceed
    nan_policy: str = "reject"  # reject | zero
    max_clients: int = 1024  # live sessions at most (and --workers at most)
    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    estimators: str = "fp32"  # fp32 | bf16 | disk
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    token_file: str | None = None

    def validate(self) -> "ServerOptions":
        if self.on_deadline not in ON_DEADLINE:
            raise ConfigError(f"--on-deadline {self.on_deadline!r}; choose one of: {', '.join(ON_DEADLINE)}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"--nan-policy {self.nan_policy!r}; choose one of: {', '.join(NAN_POLICIES)}")
        if self.estimators not in ESTIMATOR_MODES:
            raise ConfigError(f"--estimators {self.estimators!r}; choose one of: {', '.join(ESTIMATOR_MODES)}")
        if self.estimators == "disk" and not self.checkpoint_dir:
            raise ConfigError("--estimators disk spills to files under --checkpoint-dir DIR: give one")
        if self.round_deadline is not None and not (self.round_deadline > 0 and math.isfinite(self.round_deadline)):
            raise ConfigError(f"--round-deadline {self.round_deadline!r} must be > 0 seconds")
        if self.checkpoint_every < 0 or self.checkpoint_keep < 1:
            raise ConfigError("--checkpoint-every must be >= 0 and the number of checkpoints kept >= 1")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError("--checkpoint-every needs --checkpoint-dir DIR")
        if self.max_clients < 1:
            raise ConfigError(f"--max-clients {self.max_clients} must be >= 1")
        if not (1 << 20) + 4096 <= self.max_message_bytes <= (1 << 31) - 1:
            raise ConfigError(f"--max-message-bytes {self.max_message_bytes} must be in [1 MiB + 4 KiB, 2 GiB): "
                              "a chunk message is up to 1 MiB plus a few bytes")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both --tls-cert and --tls-key (the server's certificate and key), or neither")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key as well")
        return self


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class RunAborted(EfmuonError):
    """The run cannot go on (a client left early, or the server failed)."""


class Rejected(Exception):
    """A request refused at the edge; `code` is the name of a grpc.StatusCode."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class ServerModel:
    """What the server knows about the model besides the config.

    Optional hooks, all run on the server's compute thread:
      `evaluate(W, X) -> dict`  after rounds the config asks to evaluate: "loss_w", "loss_x" and any
                                extra round entries (e.g. "val_loss_w");
      `initial(W) -> dict`      once before round 1: summary entries (e.g. "initial_loss");
      `final(W, X) -> dict`     after the last round: summary entries (eval_loss_w, f_star, ...).
    """

    names: list[str]
    params: list[torch.Tensor]
    specs: list[LayerSpec]
    evaluate: Callable[[list, list], dict] | None = None
    initial: Callable[[list], dict] | None = None
    final: Callable[[list, list], dict] | None = None

    @classmethod
    def from_setup(cls, setup) -> "ServerModel":
        """A built-in task, evaluated exactly as `efmuon simulate` does."""
        from efmuon.common.simulate import eval_losses
        from efmuon.common.training import evaluate

        eval_model = setup.task.build_model()
        task = setup.task

        def per_round(W, X) -> dict:
            lw, lx = eval_losses(setup, eval_model, W, X)
            return {"loss_w": lw, "loss_x": lx, "val_loss_w": evaluate(eval_model, W, task.eval_loss)}

        def initial(W) -> dict:
            return {"initial_loss": evaluate(eval_model, W, task.train_eval_loss)}

        def final(W, X) -> dict:
            return {"eval_loss_w": evaluate(eval_model, W, task.eval_loss),
                    "eval_loss_x": evaluate(eval_model, X, task.eval_loss),
                    "f_star": getattr(task, "f_star", None)}

        return cls(setup.names, setup.params, setup.specs, evaluate=per_round, initial=initial, final=final)


@dataclass
class Session:
    client_id: int
    token: str
    name: str
    confirmed: bool = False  # the Join reply was streamed completely
    left: bool = False
    reason: str = ""  # why it left (Leave's reason), for the deadline's error message


@dataclass
class Plan:
    """The reply to round k's submissions: S_{k+1}'s frames, cut into chunk messages once."""

    round: int
    done: bool
    frame_lengths: list[int]
    chunks: list[pb.Downlink] = field(default_factory=list)
    chunk_message_bytes: int = 0

    @classmethod
    def build(cls, round_: int, frames: Sequence[bytes] | None) -> "Plan":
        if frames is None:
            return cls(round_, True, [])
        chunks = [pb.Downlink(chunk=c) for c in protocol.iter_chunks(frames)]
        return cls(round_, False, [len(f) for f in frames], chunks, sum(m.ByteSize() for m in chunks))

    @property
    def payload(self) -> int:
        return sum(self.frame_lengths)

    def header(self, duplicate: bool = False, with_frames: bool = True) -> pb.Downlink:
        return pb.Downlink(header=pb.DownlinkHeader(
            round=self.round, done=self.done, duplicate=duplicate,
            frame_lengths=self.frame_lengths if with_frames else []))


class Coordinator:
    """Sessions, the round barrier and the report of one run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, model: ServerModel, device: str | torch.device = "cpu",
                 quiet: bool = False, stream=None, leave_timeout: float = LEAVE_TIMEOUT):
        self.cfg = cfg
        self.n, self.rounds = int(cfg.workers), int(cfg.rounds)
        self.model = model
        self.state = ServerState(model.params, model.specs, cfg, self.n, device=device)
        self.fingerprint = protocol.fingerprint(model.names, model.params)
        self.config_bytes = protocol.encode_config(cfg)
        self.numel = sum(p.numel() for p in model.params)
        self.frame_limit = 16 * self.numel + 4096 * len(model.params) + protocol.CHUNK_BYTES
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="efmuon-state")
        self.report = Report(cfg.to_dict(), transport=True, metrics_path=cfg.metrics, log_every=cfg.log_every,
                             total_rounds=self.rounds, stream=stream, quiet=quiet)
        self.quiet = quiet
        self.leave_timeout = leave_timeout
        self.t_start = time.monotonic()
        # sessions and the round being collected
        self.sessions: dict[int, Session] = {}
        self.collecting = 0
        self.submitted: set[int] = set()
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.train_losses: dict[int, float] = {}
        self.results: dict[int, asyncio.Future] = {}
        self.last_plan: Plan | None = None
        self.phase = "collecting"
        self.loss_w: float | None = None
        self.loss_x: float | None = None
        self.failed: BaseException | None = None
        self.stopping = False
        self.ledger = ByteLedger(self.report, self.rounds)
        self.initial_facts: dict = {}
        self._init_w: tuple[list[int], list[bytes]] | None = None
        self._init_lock = asyncio.Lock()
        self._step_t0 = 0.0
        self._all_left = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.finished = asyncio.Event()
        self._summary_written = False

    # ------------------------------------------------------------------ helpers
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _spawn(self, coro) -> None:
        """Run `coro` as a task the loop keeps (asyncio holds only weak references to tasks)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _result(self, round_: int) -> asyncio.Future:
        fut = self.results.get(round_)
        if fut is None:
            fut = self.results[round_] = asyncio.get_running_loop().create_future()
        return fut

    def session(self, client_id: int, token: str) -> Session:
        s = self.sessions.get(client_id)
        if s is None or not s.confirmed:
            raise Rejected("FAILED_PRECONDITION", f"client {client_id} has not joined this run; call Join first")
        if not secrets.compare_digest(s.token, token):
            raise Rejected("FAILED_PRECONDITION", f"the session token for client {client_id} is not the one "
                           "Join issued; another process holds this client id")
        return s

    # ------------------------------------------------------------------ join
    def join(self, client_id: int | None, version: int, parameters: Sequence[pb.ParameterInfo], name: str) -> Session:
        """Validate a Join and reserve the client id. Raises Rejected; changes nothing when it does."""
        if self.stopping:
            raise Rejected("UNAVAILABLE", "the server is shutting down")
        if version != protocol.PROTOCOL_VERSION:
            raise Rejected("FAILED_PRECONDITION", f"protocol version {version} is not supported: this server speaks "
                           f"efmuon.v1 protocol version {protocol.PROTOCOL_VERSION}; upgrade the worker or the server")
        why = protocol.fingerprint_mismatch(parameters, self.fingerprint)
        if why:
            raise Rejected("FAILED_PRECONDITION", f"model fingerprint mismatch: {why}; the worker must build the "
                           "same model as the server")
        if self.collecting > 0 or self.failed is not None:
            raise Rejected("FAILED_PRECONDITION", f"the run is already at round {self.collecting}; joining a "
                           "running run is not supported")
        if client_id is None:
            free = [j for j in range(self.n) if j not in self.sessions]
            if not free:
                raise Rejected("RESOURCE_EXHAUSTED", f"all {self.n} client ids of this run are taken")
            client_id = free[0]
        elif not 0 <= client_id < self.n:
            raise Rejected("INVALID_ARGUMENT", f"client id {client_id} is not valid: this run has clients "
                           f"0..{self.n - 1} (workers={self.n})")
        elif client_id in self.sessions:
            raise Rejected("ALREADY_EXISTS", f"client id {client_id} is already held by a live session "
                           f"({self.sessions[client_id].name or 'unnamed'}); pick another id")
        s = Session(client_id, secrets.token_hex(16), name)
        self.sessions[client_id] = s
        log.info("client %d joined (%s)", client_id, name or "unnamed")
        return s

    async def initial_w(self) -> tuple[list[int], list[bytes]]:
        """Frame lengths and chunks of X_0 (raw float32), built once for every client."""
        async with self._init_lock:
            if self._init_w is None:
                def build():
                    frames = protocol.raw_frames(self.state.W)
                    return [len(f) for f in frames], list(protocol.iter_chunks(frames))
                self._init_w = await self._run(build)
            return self._init_w

    def confirm_join(self, s: Session, request_bytes: int, reply_bytes: int, payload: int) -> None:
        s.confirmed = True
        self.ledger.record(0, s.client_id, "up", "message", request_bytes)
        self.ledger.record(0, s.client_id, "down", "message", reply_bytes)
        self.ledger.record(0, s.client_id, "down", "payload", payload)

    def abort_join(self, s: Session) -> None:
        if self.sessions.get(s.client_id) is s and not s.confirmed:
            del self.sessions[s.client_id]
            log.warning("client %d: the initial W could not be delivered; the id is free again", s.client_id)

    # ------------------------------------------------------------------ rounds
    def classify(self, s: Session, round_: int) -> str:
        """'new', 'pending' (duplicate of the round being collected), 'last' (duplicate of the last
        applied round) or 'stale'. A round from the future is refused."""
        if self.failed is not None:
            raise Rejected("ABORTED", f"the run was aborted: {self.failed}")
        if round_ > self.collecting or (round_ == self.collecting and self.collecting > self.rounds):
            raise Rejected("FAILED_PRECONDITION", f"round {round_} is not open: the server is collecting round "
                           f"{self.collecting} (0 = the initial submission, the run has {self.rounds} rounds)")
        if round_ == self.collecting:
            return "pending" if s.client_id in self.submitted else "new"
        return "last" if round_ == self.collecting - 1 else "stale"

    def expected_frames(self, round_: int) -> tuple[int, ...]:
        if round_ == 0 and self.cfg.init == "zero":
            return (0,)
        return (len(self.model.specs),)

    async def accept(self, s: Session, round_: int, frames: Sequence, train_loss: float,
                     previous: pb.WireReport | None, payload: int, message: int) -> str:
        """Decode and store a new submission; start the round when it is the n-th. Returns the
        classification at storing time ('new', or 'pending' when a concurrent copy won)."""
        j = s.client_id
        decoded = []
        if frames:
            try:
                decoded = (await self._run(self.state.decode_uplinks, {j: list(frames)}, round_ == 0))[j]
            except (FrameError, ProtocolError) as exc:
                raise Rejected("INVALID_ARGUMENT", f"round {round_}: {exc}; nothing was applied, resend a valid "
                               "submission") from None
        kind = self.classify(s, round_)  # re-check: the decode awaited
        if kind != "new":
            return kind
        self.submitted.add(j)
        if decoded:
            self.pending[j] = decoded
        if math.isfinite(train_loss):
            self.train_losses[j] = float(train_loss)
        self.ledger.record(round_, j, "up", "payload", payload)
        self.ledger.record(round_, j, "up", "message", message)
        self.ledger.record_wire(j, previous)
        self._result(round_)
        if len(self.submitted) == self.n:
            self._spawn(self._process(round_))
        return "new"

    async def result(self, round_: int) -> Plan:
        return await asyncio.shield(self._result(round_))

    def reply_for(self, kind: str, round_: int) -> Plan:
        if kind == "last" and self.last_plan is not None:
            return self.last_plan
        return Plan(round_ + 1, round_ >= self.rounds, [])

    async def _process(self, k: int) -> None:
        """All n submissions of round k are in: aggregate, evaluate, step, publish S_{k+1}."""
        fut = self._result(k)
        decoded, self.pending = self.pending, {}
        losses, self.train_losses = self.train_losses, {}
        try:
            self.phase = "aggregating"
            if decoded:
                await self._run(self.state.apply_decoded, decoded)
            del decoded
            facts: dict = {}
            if k >= 1:
                facts["seconds"] = time.perf_counter() - self._step_t0
                facts["train_loss"] = sum(losses.values()) / len(losses) if losses else None
                facts["loss_w"] = facts["loss_x"] = None
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
                plan = await self._run(lambda: Plan.build(k + 1, self.state.step()))
            else:
                plan = Plan.build(k + 1, None)
            if k == 0:
                self._init_w = None  # every client has W; free the cached X_0 chunks
            self.last_plan = plan
            self.collecting, self.submitted = k + 1, set()
            self.phase = "collecting" if k < self.rounds else "finished"
            self.results.pop(k - 1, None)
            fut.set_result(plan)
            if k == self.rounds:
                self._spawn(self._wrap_up())
        except BaseException as exc:  # a bug or an exhausted machine: stop the run loudly
            if not self.stopping:
                log.exception("round %d failed", k)
            self.failed = RunAborted(f"the server failed in round {k}: {type(exc).__name__}: {exc}")
            self.phase = "failed"
            if not fut.done():
                fut.set_exception(Rejected("INTERNAL", str(self.failed)))
            self.finished.set()

    def record_down(self, plan: Plan, j: int, message: int) -> None:
        """The reply `plan` (S_{plan.round}, or the final `done`) was streamed to client j."""
        k = plan.round - 1 if plan.done else plan.round
        self.ledger.record(k, j, "down", "payload", plan.payload)
        self.ledger.record(k, j, "down", "message", message)

    def leave(self, s: Session, last: pb.WireReport | None, reason: str) -> None:
        if not s.left:
            self.ledger.record_wire(s.client_id, last)
        s.left = True
        if reason:
            log.warning("client %d left: %s", s.client_id, reason)
        else:
            log.info("client %d left", s.client_id)
        if self.collecting <= self.rounds and self.failed is None and not self.stopping:
            self.abort(f"client {s.client_id} left before the last round ({reason or 'no reason given'}); "
                       f"a synchronous run cannot go on without it")
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

    # ------------------------------------------------------------------ report
    async def _wrap_up(self) -> None:
        try:
            await asyncio.wait_for(self._all_left.wait(), timeout=self.leave_timeout)
        except asyncio.TimeoutError:
            missing = [j for j in range(self.n) if not self.sessions[j].left]
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
        summary = self.report.finish(
            **self.initial_facts,
            **{k: extra.get(k) for k in ("eval_loss_w", "eval_loss_x", "f_star")},
            uncompressed_bytes={"up": n * full * (rounds + (1 if self.cfg.init == "grad" else 0)),
                                "down": n * full * (rounds + 1)},
            w_sha256=extra["w_sha256"], x_sha256=extra["x_sha256"], parameters=self.numel, workers=n,
            client_bytes=self.ledger.client_bytes, init_clients=self.ledger.init_clients,
            **({"partial": True} if partial else {}),
        )
        if not self.quiet:
            self.report.print_summary()
        if self.cfg.report or self.cfg.plots:
            from efmuon.common.simulate import write_outputs

            await self._run(write_outputs, self.report, self.cfg, self.quiet, self.report.stream)
        return summary

    async def stop(self) -> None:
        """Interrupted: write what we have (a partial report) unless the run finished."""
        self.stopping = True
        self.phase = "stopping"
        if not self._summary_written:
            await self.write_summary(partial=True)
        self.finished.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

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
            parameters=self.fingerprint, uptime_seconds=time.monotonic() - self.t_start)
        if self.loss_w is not None:
            reply.loss_w = self.loss_w
        if self.loss_x is not None:
            reply.loss_x = self.loss_x
        return reply

"""The server's round logic: sessions, the synchronous barrier, the step and the report. No gRPC here.

`Coordinator` owns a `ServerState` (X, W, G of docs/design.md §1) and turns the clients'
calls into the core's round, exactly in the order `efmuon simulate` uses:

    round 0   all n initial submissions in  ->  aggregate(init=True)            (init = 'grad')
    round k   all n submissions of k in     ->  aggregate; evaluate loss at W and X; step()
              step() returns the frames of S_{k+1} once; the same bytes go to every client
    after R   a `done` reply; wait for every client's Leave (it carries the last wire figures),
              then write the report.

Everything that touches tensors (decoding, aggregate, evaluation, step, chunking) runs on one
worker thread (`loop.run_in_executor`), so the event loop keeps answering Status and
accepting submissions while a round is computed, and the state is only ever touched by one
thread at a time. Uplinks are decoded as they arrive (one client at a time, by
`ServerState.decode_uplink`, the simulator's own check; a bad frame is refused with
INVALID_ARGUMENT and nothing changes) and applied together, sorted by client id, so the sum is
the same as `ServerState.aggregate` computes.

The Coordinator is put together from its parts, one module each:

    sessions     Join (validation, the id, the reply's payload), the session check, Leave
    rounds       the barrier: classify, accept, the deadline, the reply to each submission
    persistence  checkpoints and resuming from one
    status       the Status reply
    coordinator  (here) the run's state, processing a complete round (aggregate, evaluate, step,
                 publish), aborting, stopping and the report's summary

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
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from ..common.algorithm import ServerState, params_sha256
from ..common.config import RunConfig, resolve
from ..common.errors import ConfigError
from ..common.export import save_model
from ..common.outputs import write_outputs
from ..common.report import Report
from ..common.shardmerge import shard_summary
from ..common.runtime import peak_rss_bytes, return_freed_memory, trim_heap
from ..common.wire import protocol
from .errors import Rejected, RunAborted
from .estimators import EstimatorStore
from .ledger import ByteLedger
from .model import ServerModel
from .options import LEAVE_TIMEOUT, ServerOptions
from .cohorts import Cohorts
from .persistence import Persistence
from .pipelined import Pipelining
from .plan import Plan
from .rounds import Phase, RoundBarrier, SubmissionKind
from .sessions import Session, Sessions
from .status import status_reply

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..v1 import service_pb2 as pb

__all__ = ["Coordinator", "Phase", "Plan", "Rejected", "ServerModel", "ServerOptions", "Session", "SubmissionKind"]

log = logging.getLogger("efmuon.server")


class Coordinator(Sessions, RoundBarrier, Persistence, Cohorts, Pipelining):
    """Sessions, the round barrier, the step and the report of one run (see the module docstring).

    Timing hook (for the benchmarks): `events`, None by default and settable after construction, is
    called as
        events("recv", round, t_first_byte, t_complete)   a submission's chunks were reassembled
                                                          (the servicer's Exchange, first chunk to last)
        events("process", k, t0, t1)                      around round k's processing (`_process`)
        events("decode", round, t0, t1)                   a submission's frames were decoded (`accept`: from
                                                          the call to its result, a wait for the compute
                                                          thread included; --pipeline decodes frame by frame)
        events("step", k, t0, t1)                         round k's step and reply (S_{k+1}: LMO, update,
                                                          downlink encode, chunking; k < rounds)
        events("record_down", round, t, t)                a reply was streamed to a client
                                                          (round = plan.round - 1)
        events("frame", round, t, t)                      --pipeline: an uplink frame was complete
        events("lmo_unit", round, t0, t1)                 --pipeline: one LMO unit's step (compute thread's
                                                          times, reported once the round is committed)
    with `time.perf_counter()` times, on the event loop's thread. When it is None nothing is timed.

    `observer` (health and metrics, server.observability; `service.start` sets it) is told when a
    round ends and when the run stops or fails.
    """

    events: Callable[[str, int, float, float], None] | None = None
    observer = None  # a server.observability.Observability (not imported: it reads the Coordinator)

    def __init__(self, cfg: RunConfig, model: ServerModel, device: str | torch.device = "cpu",
                 quiet: bool = False, stream=None, leave_timeout: float = LEAVE_TIMEOUT,
                 options: ServerOptions | None = None, resume=None):
        self.opts = (options or ServerOptions()).validate()
        self.cfg = cfg = resolve(cfg, {})  # fields left unset take the generic defaults (a Setup's cfg has none)
        self.n, self.rounds = Cohorts.federation_n(cfg), int(cfg.rounds)
        if self.n > self.opts.max_clients:
            raise ConfigError(f"workers={self.n} is more than --max-clients {self.opts.max_clients}")
        self.model = model
        self._init_state(model, device)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="efmuon-state")
        self.report = Report(cfg.to_dict(), transport=True, metrics_path=cfg.metrics, log_every=cfg.log_every,
                             total_rounds=self.rounds, stream=stream, quiet=quiet)
        self.quiet = quiet
        self.leave_timeout = leave_timeout
        self.t_start = time.monotonic()
        self.phase = Phase.COLLECTING
        self.failed: BaseException | None = None
        self.stopping = False
        self.ledger = ByteLedger(self.report, self.rounds)
        self._lock = asyncio.Lock()  # held while a round is processed and while a Join snapshots the state
        self._step_t0 = 0.0
        self._tasks: set[asyncio.Task] = set()
        self.finished = asyncio.Event()
        self._summary_written = False
        self._init_sessions()
        self._init_barrier()
        self._init_cohorts()
        self._init_persistence()
        self._init_pipeline()
        # what the report and Status say besides the ledger's bytes
        self.loss_w: float | None = None
        self.loss_x: float | None = None
        self.initial_facts: dict = {}
        self.rejected = 0
        self.nonfinite_zeroed = 0
        self.partial_rounds = 0
        if resume is not None:
            self._restore(resume)

    def _init_state(self, model: ServerModel, device: str | torch.device) -> None:
        """The algorithm's state from the model, and what the protocol derives from the model."""
        # before X, W and G are allocated: they and everything after come from mmap, not the heap
        return_freed_memory(sum(4 * p.numel() for p in model.params))
        self.state = ServerState(model.params, model.specs, self.cfg, self.n, device=device,
                                 nan_policy=self.opts.nan_policy, layer_ids=model.layer_ids)
        self.state.estimators = EstimatorStore([s.shape for s in model.specs], self.opts.estimators,
                                               self.opts.checkpoint_dir)
        self.fingerprint = protocol.fingerprint(model.names, model.params)
        self.config_bytes = protocol.encode_config(self.cfg)
        self.numel = sum(p.numel() for p in model.params)
        self.frame_limit = 16 * self.numel + 4096 * len(model.params) + protocol.CHUNK_BYTES
        model.params = []  # ServerState copied them into X and W: do not keep a third copy alive
        trim_heap(4 * self.numel)  # ... nor the heap pages they (and their construction) occupied

    # ------------------------------------------------------------------ helpers
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _observe(self) -> None:
        """The run's state changed (stopping, failed): tell the observer (health, metrics)."""
        if self.observer is not None:
            self.observer.update(self)

    def _spawn(self, coro) -> asyncio.Task:
        """Run `coro` as a task the loop keeps (asyncio holds only weak references to tasks)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ processing a round
    async def _process(self, k: int, missing: list[int]) -> None:
        """Round k's submissions are in (all n, or those present at the deadline): aggregate,
        evaluate, step, checkpoint, publish S_{k+1}. Cohort runs also apply the registrations and
        draw the next cohort (server.cohorts); one short of --min-cohort waits for clients with the
        lock released (so that they can join), then steps."""
        t0 = time.perf_counter()
        try:
            fut = self._result(k)
            facts = None
            cohort: list[int] | None = None
            async with self._lock:
                present, decoded, zeroed, losses = self._take_round()
                if k == 0:
                    # free the cached X_0 chunks now: a Join waits for this lock and, once round 0 is
                    # processed, is answered from the state (re-sync), never from this cache
                    self._init_w = None
                    if self.cohorts:
                        self.set_members_count(present)
                try:
                    await self._aggregate(k, present, decoded, zeroed, missing)
                    del decoded
                    if losses:  # muonmax-momo's loss model (a no-op for the other presets)
                        await self._run(self.state.observe_losses, losses, k == 0)
                    if self.cohorts:
                        self.cohort_round_applied(k, present)
                        regs, self.registrations = self.registrations, {}
                        if regs:
                            await self._run(self.state.register, regs)
                            self.members |= set(regs)
                            log.info("client(s) %s registered: %d members", sorted(regs), len(self.members))
                    facts = await self._evaluate(k, missing, losses)
                    facts.update(self.cohort_facts(k))
                    self.ledger.set_facts(k, facts)
                    self.ledger.set_client_facts(k, self.client_facts(k))
                    self.ledger.report_upto(k - 1)
                    if self.cohorts and k < self.rounds:
                        cohort = self.sample_now(k + 1)
                    if cohort is not None or not self.cohorts or k >= self.rounds:
                        plan = await self._next_plan(k, missing, cohort)
                        await self._publish(k, plan, fut, cohort)
                        cohort = None
                    else:
                        cohort = []  # short of --min-cohort: wait below, without the lock
                except BaseException as exc:  # a bug or an exhausted machine: stop the run loudly
                    self._round_failed(k, exc, fut)
                    return
            if cohort is not None:
                try:
                    cohort = await self.wait_quorum(k + 1)
                    async with self._lock:
                        plan = await self._next_plan(k, missing, cohort)
                        await self._publish(k, plan, fut, cohort)
                except Rejected as exc:
                    self.abort(str(exc))
                    return
                except BaseException as exc:
                    self._round_failed(k, exc, fut)
                    return
            if self.observer is not None and facts is not None:
                self.observer.round_end(self, facts.get("seconds"))
        finally:
            if self.events is not None:
                self.events("process", k, t0, time.perf_counter())

    async def _aggregate(self, k: int, present: list[int], decoded: dict, zeroed: dict[int, int],
                         missing: list[int] = ()) -> None:
        self.phase = Phase.AGGREGATING
        if self.pipeline_takes(k, present, list(missing), decoded):
            decoded.clear()  # the pipelined step holds them and applies G with its commit (`take_step`)
        elif decoded:
            await self._run(self.state.apply_decoded, decoded, True)  # consumes `decoded`
        for j in present:
            self.last_applied[j] = k
        self.nonfinite_zeroed += sum(zeroed.values())

    async def _evaluate(self, k: int, missing: list[int], losses: dict[int, float]) -> dict:
        """Round k's entries of the report (losses, seconds, ...); round 0: the initial facts."""
        facts: dict = {}
        if missing:
            facts["skipped_clients"] = list(missing)
        if k >= 1:
            facts["seconds"] = time.perf_counter() - self._step_t0
            facts["train_loss"] = sum(losses.values()) / len(losses) if losses else None
            facts["loss_w"] = facts.get("loss_w")
            facts["loss_x"] = facts.get("loss_x")
            if self.model.evaluate and (k % self.cfg.eval_every == 0 or k == self.rounds):
                self.phase = Phase.EVALUATING
                facts.update(await self._run(self.model.evaluate, self.state.W, self.state.X))
                self.loss_w, self.loss_x = facts["loss_w"], facts["loss_x"]
        elif self.model.initial:
            self.phase = Phase.EVALUATING
            self.initial_facts = await self._run(self.model.initial, self.state.W)
        return facts

    async def _next_plan(self, k: int, missing: list[int], cohort: list[int] | None = None) -> Plan:
        """The reply to round k: S_{k+1} from the step, or `done` after the last round. Cohort runs:
        W_k is kept whole first when a member of the next cohort will need it (server.cohorts)."""
        if k >= self.rounds:
            return Plan.build(k + 1, None)
        self.phase = Phase.STEPPING
        self._step_t0 = time.perf_counter()
        if not self.cohorts and not missing and self.last_plan is not None:
            # every client submitted round k, so each has S_k: nobody can still ask for the
            # previous reply (a stray duplicate of round k-1 gets a resync). Free its chunks
            # before the new ones are built rather than holding both.
            self.last_plan.release()
        full = self.cohorts and self.needs_full_w(k + 1, cohort or [])
        plan = await self._run(self._step_and_plan, k, full)
        if self.events is not None:
            self.events("step", k, self._step_t0, time.perf_counter())
        self.report_units(k)
        return plan

    def _step_and_plan(self, k: int, full_w: bool = False) -> Plan:
        """The step of round k and its reply (on the compute thread)."""
        if full_w:
            self.snapshot_full_w(k + 1)
        plan = Plan.build(k + 1, self.take_step())
        # the round's uplinks arrived as many small gRPC buffers (heap); freed, their pages would stay
        # resident under the next round's (mmapped) R_j: return them now (large models only)
        trim_heap(4 * self.numel)
        return plan

    async def _publish(self, k: int, plan: Plan, fut: asyncio.Future, cohort: list[int] | None = None) -> None:
        """Round k is done: checkpoint when due, then release `plan` to the clients waiting for it (cohort runs:
        no held Exchange sees the new round before the checkpoint that knows it is written)."""
        self.held_back = True
        self._close_round(k, plan)
        if self.cohorts:
            self.remember(plan)
            self.open_round(k + 1, cohort or [])
        if self._checkpoint_due():
            self.phase = Phase.CHECKPOINTING
            await self.checkpoint()
        self.phase = Phase.COLLECTING if k < self.rounds else Phase.FINISHED
        self.results.pop(k - 1, None)
        fut.set_result(plan)
        self.held_back = False
        if self.cohorts:
            self._wake()
        if k == self.rounds:
            self._spawn(self._wrap_up())
        else:
            self._arm_deadline(k + 1)
            if self.cohorts and not self.cohort:
                self._start_processing(k + 1)  # nobody to wait for (no client eligible and proceeding)

    def _round_failed(self, k: int, exc: BaseException, fut: asyncio.Future) -> None:
        self.state_broken = True
        if not self.stopping:
            log.exception("round %d failed", k)
        self.failed = RunAborted(f"the server failed in round {k}: {type(exc).__name__}: {exc}")
        self.phase = Phase.FAILED
        if not fut.done():
            fut.set_exception(Rejected("INTERNAL", str(self.failed)))
        if self.cohorts:
            self._wake()
        self.finished.set()
        self._observe()

    def record_down(self, plan: Plan, j: int, message: int) -> None:
        """The reply `plan` (S_{plan.round}, or the final `done`) was streamed to client j."""
        if self.events is not None:
            t = time.perf_counter()
            self.events("record_down", plan.round - 1, t, t)
        k = plan.round - 1 if plan.done else plan.round
        self.ledger.record(k, j, "down", "payload", plan.payload)
        self.ledger.record(k, j, "down", "message", message)

    def abort(self, why: str) -> None:
        """End the run early: every client waiting for a round gets ABORTED with `why`."""
        log.error("aborting the run: %s", why)
        self.failed = RunAborted(why)
        self.phase = Phase.FAILED
        for fut in self.results.values():
            if not fut.done():
                fut.set_exception(Rejected("ABORTED", f"the run was aborted: {why}"))
        if self.cohorts:
            self._wake()
        self.finished.set()
        self._observe()

    def start(self) -> None:
        """Called once the server listens: arm the deadline of a resumed run's open round. A resumed round's
        `seconds` count from here, not from the step before the outage (that clock died with the old process)."""
        self._step_t0 = time.perf_counter()
        if self.cohorts and self.resumed_from:
            self.resumed_members()
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
        await self._save_model()
        self.finished.set()

    async def _save_model(self) -> None:
        """--save-model PATH: write the final W (common.export) once the report is written. A failure fails
        the run (the CLI names it) but keeps the report and the checkpoints."""
        path = self.opts.save_model
        if not path or self.failed is not None:
            return
        try:
            await self._run(lambda: save_model(path, self.model.names, self.state.W, self.state.X,
                                               cfg=self.cfg.to_dict(), round_=self.state.round, force_flag=None))
        except Exception as exc:  # noqa: BLE001 - any failure must end the run loudly, not hang it
            log.error("--save-model %s failed: %s", path, exc)
            self.failed = RunAborted(f"the run finished, but --save-model {path} failed: {exc}")
            return
        if not self.quiet:
            print(f"efmuon: saved W to {path} (safetensors)", file=self.report.stream, flush=True)

    async def write_summary(self, partial: bool = False) -> dict:
        """Finish the report (also after an interrupted run, with partial=True) and write it."""
        if self._summary_written:
            return self.report.summary
        self._summary_written = True
        if not partial:
            self.ledger.report_upto(self.rounds)
        W, X = self.state.W, self.state.X

        def compute() -> dict:
            extra = self.model.final(W, X) if (self.model.final and not partial) else {}
            out = {**extra, "w_sha256": params_sha256(W, self.model.names),
                   "x_sha256": params_sha256(X, self.model.names)}
            if self.model.shard is not None:
                out["shard"] = shard_summary(self.model, W, X, self.cfg.report, self.state.round)
            return out

        extra = await self._run(compute)
        summary = self.report.finish(**self._summary_entries(extra, partial))
        if not self.quiet:
            self.report.print_summary()
        if self.cfg.report or self.cfg.plots:
            await self._run(write_outputs, self.report, self.cfg, self.quiet, self.report.stream)
        return summary

    def _summary_entries(self, extra: dict, partial: bool) -> dict:
        """The server's entries of the report's summary; `extra`: the final evaluation and the hashes."""
        n, full = self.n, 4 * self.numel
        rounds = self.rounds if not partial else max(0, self.ledger.reported_upto)
        resilience = {"nonfinite_zeroed": self.nonfinite_zeroed, "partial_rounds": self.partial_rounds,
                      "rejected_requests": self.rejected, **self.ledger.resilience()}
        if self.resumed_from:
            resilience["resumed_from"] = self.resumed_from
        uncompressed = ({"up": n * full * (rounds + (1 if self.cfg.init == "grad" else 0)),
                         "down": n * full * (rounds + 1)} if not self.cohorts else self.cohort_uncompressed(rounds))
        return dict(
            **self.initial_facts,
            **{k: extra.get(k) for k in ("eval_loss_w", "eval_loss_x", "f_star")},
            uncompressed_bytes=uncompressed,
            w_sha256=extra["w_sha256"], x_sha256=extra["x_sha256"], parameters=self.numel, workers=n,
            client_bytes=self.ledger.client_bytes, init_clients=self.ledger.init_clients,
            resilience=resilience, wire_source=self.ledger.wire_source, server_peak_rss_bytes=peak_rss_bytes(),
            **({"federated": self.federated_summary()} if self.cohorts else {}),
            **({"shard": extra["shard"]} if "shard" in extra else {}),
            **({"partial": True} if partial else {}),
        )

    async def stop(self) -> None:
        """Interrupted: checkpoint (between rounds) and write what we have (a partial report)."""
        self.stopping = True
        self.phase = Phase.STOPPING
        self._observe()
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
        if self.cohorts:
            self._wake()
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

    # ------------------------------------------------------------------ shards
    def shard_fields(self) -> dict:
        """JoinHeader's and StatusReply's shard fields: empty for a server of the whole model."""
        if self.model.shard is None:
            return {}
        index, count = self.model.shard
        return {"shard_index": index, "shard_count": count, "shard_layers": list(self.model.layer_ids)}

    # ------------------------------------------------------------------ status
    def status(self) -> pb.StatusReply:
        return status_reply(self)

    def state_sha256(self) -> str:
        """sha256 over X, W, G and every estimator (for tests: did a request change the state?)."""
        h = hashlib.sha256()
        for group in (self.state.X, self.state.W, self.state.G):
            for t in group:
                h.update(t.detach().contiguous().cpu().numpy().tobytes())
        for j in sorted(self.state.estimators or {}):
            for t in self.state.estimators[j]:
                h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

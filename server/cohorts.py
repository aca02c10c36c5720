"""Cohort rounds (a federation over the network): who is sampled, who may submit, catch-up, stragglers,
clients that register late, vanish and come back.

`Cohorts` is one part of the `Coordinator` (a mixin), active when the run configuration runs cohorts
(`common.federation.runs_cohorts`: clients, participation, deadline or compute_* given). It follows
docs/design.md §6, the rules `efmuon simulate` applies on its simulated clock, so that a networked
federation and a simulated one with the same flags end in the same bits:

* **Members.** n = `clients` ids. Round 0 waits for all n initial submissions (up to the round
  deadline; then it proceeds with those present). Those are the members; `ServerState.n` is their
  number and G = mean_j G_j over them. A client joining later registers (`JoinHeader.register`): its
  initial submission is applied between two rounds (`ServerState.register`: G is recomputed as the
  mean over the new membership).
* **Cohorts.** The cohort of round k+1 is drawn when round k is processed, before the step, by
  `federation.sample_cohort(seed, k+1, eligible, m)` with m = round(participation * members): with
  every member eligible this is `simulate`'s `sample_clients`. Eligible: a member with a live session
  that has a call open or was heard from within `--client-timeout` s (a vanished client is dropped
  from the cohorts until it calls again). With fewer eligible than `--min-cohort`, the round waits
  for clients up to the round deadline, then proceeds with those there (`--on-deadline proceed`) or
  fails the run.
* **Replies.** Only the cohort submits. The reply to any Exchange (a submission, a duplicate, a late
  one, or an idle one: `SubmissionHeader.idle`) is the next round the client is sampled in, held by
  the server until then (`next_reply`), or `wait` after `POLL_S` s (the client asks again), or `done`.
* **Catch-up.** A sampled client holding W_s gets, before S_k, the missed downlinks S_{s+1}..S_{k-1}
  or W_{k-1} as identity frames, whichever is fewer bytes (the replay window keeps the newest
  downlinks up to one full W of bytes: an older replay would cost more than W anyway). W_{k-1} is
  snapshotted before the step only when a cohort member needs it. Catch-up bytes are recorded per
  client and round (`rounds[k].clients[j].catchup`, `rounds[k].catchup`).
* **Stragglers.** With `deadline`, a round closes that many seconds after it opened (the downlink was
  published) with the members that submitted; the others are dropped from it (`rounds[k].dropped`).
  A dropped client that submits later is told `late`: it restores its M_j, G_j and keeps its W_k.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch

from ..common.compress import parse_spec
from ..common.federation import AdaptiveDeadline, clients_per_round, federation_size, runs_cohorts, sample_cohort
from ..v1 import service_pb2 as pb
from .errors import Rejected
from .plan import Plan

log = logging.getLogger("efmuon.server")

POLL_S = 45.0  # a held Exchange is answered `wait` after this long (the client asks again)
CLIENT_TIMEOUT_S = 60.0  # default --client-timeout: a member silent this long (no open call) is not sampled
QUORUM_POLL_S = 0.1  # how often a round short of --min-cohort looks for clients again


@dataclass
class CohortReply:
    """What a client is sent: the round it computes next (S_round's frames), with its catch-up."""

    round: int
    plan: Plan  # S_round (or the final `done`)
    catchup: list = field(default_factory=list)  # Plans whose chunks come first (replayed S_i, or W_{round-1})
    catchup_full: bool = False
    catchup_from: int = 0
    late: bool = False
    wait: bool = False
    resync: bool = False

    @property
    def catchup_lengths(self) -> list[int]:
        return [n for p in self.catchup for n in p.frame_lengths]

    @property
    def catchup_bytes(self) -> int:
        return sum(p.payload for p in self.catchup)

    def header(self) -> pb.Downlink:
        if self.wait or self.resync:
            return pb.Downlink(header=pb.DownlinkHeader(round=self.round, wait=self.wait, resync=self.resync,
                                                        duplicate=self.resync, late=self.late))
        return pb.Downlink(header=pb.DownlinkHeader(
            round=self.round, done=self.plan.done, frame_lengths=self.plan.frame_lengths, late=self.late,
            catchup_frame_lengths=self.catchup_lengths, catchup_full=self.catchup_full,
            catchup_from=self.catchup_from))

    def messages(self):
        """The chunk messages after the header: the catch-up's, then S's (each Plan's chunks as they are)."""
        if self.wait or self.resync:
            return
        for p in self.catchup:
            yield from p.chunks
        yield from self.plan.chunks


class Cohorts:
    """Cohort rounds (part of `Coordinator`, see the module docstring)."""

    def _init_cohorts(self) -> None:
        self.cohorts = runs_cohorts(self.cfg)
        self.members: set[int] = set()  # clients whose G_j is in G (registered)
        self.cohort: set[int] = set(range(self.n))  # who submits the round being collected (round 0: everyone)
        self.cohort_of: dict[int, list[int]] = {}  # round -> its cohort (for the report)
        self.held: dict[int, int] = {}  # client -> the round of the W it holds, as far as the server knows
        self.history: dict[int, Plan] = {}  # round i -> S_i, the replay window (newest, <= one full W of bytes)
        self.full_w: tuple[int, Plan] | None = None  # (k, W_{k-1} as identity frames) for round k's catch-ups
        self._current_w: Plan | None = None  # W_k as identity frames (the fallback catch-up of round k)
        self.registrations: dict[int, list | None] = {}  # decoded initial estimators, applied between rounds
        self.seen: dict[int, float] = {}  # client -> last time a call of it started or ended (monotonic)
        self.calls: dict[int, int] = {}  # client -> calls open
        self.dropped: dict[int, list[int]] = {}  # round -> cohort members dropped (stragglers / vanished)
        self.catchups: dict[int, dict[int, int]] = {}  # round -> client -> catch-up bytes
        self._published: asyncio.Event | None = None
        self.held_back = False  # a round is being published (checkpointed): no reply may show it yet
        ident = parse_spec("identity")
        self.full_w_bytes = sum(ident.frame_size(tuple(s.shape)) for s in self.model.specs)
        self.client_timeout = self.opts.client_timeout if self.opts.client_timeout is not None else CLIENT_TIMEOUT_S
        self.poll_s = POLL_S
        self.deadlines = AdaptiveDeadline(self.cfg.adaptive_deadline, self.cfg.deadline)
        self.round_deadline_used: float | None = None  # the open round's deadline (cohort rounds)
        self.round_opened = time.monotonic()
        self.round_times: list[float] = []  # seconds from the open round's start to each submission in time

    @staticmethod
    def federation_n(cfg) -> int:
        return federation_size(cfg) if runs_cohorts(cfg) else int(cfg.workers)

    # ------------------------------------------------------------------ liveness
    def call_started(self, j: int) -> None:
        self.calls[j] = self.calls.get(j, 0) + 1
        self.seen[j] = time.monotonic()

    def call_ended(self, j: int) -> None:
        self.calls[j] = max(0, self.calls.get(j, 0) - 1)
        self.seen[j] = time.monotonic()

    def eligible(self) -> list[int]:
        """Members that can be sampled now: a live session, and a call open or heard from lately."""
        now = time.monotonic()
        out = []
        for j in sorted(self.members):
            s = self.sessions.get(j)
            if s is not None and s.left:
                continue
            if s is not None and s.confirmed and self.calls.get(j, 0) > 0:
                out.append(j)
            elif now - self.seen.get(j, -1e18) < self.client_timeout:  # heard from lately (or, no session yet,
                out.append(j)  # a member of a resumed run: `resumed_members`), so it is coming back
        return out

    def resumed_members(self) -> None:
        """A resumed server has no sessions yet: its members count as heard from now, so the next cohorts are
        drawn from all of them (as the uninterrupted run would) while they re-join; one that does not come back
        within --client-timeout is left out, as a vanished client is."""
        now = time.monotonic()
        for j in self.members:
            self.seen[j] = now

    def _wake(self) -> None:
        """Something a held Exchange waits for happened (a round was published, the run ended)."""
        if self._published is not None:
            self._published.set()
        self._published = asyncio.Event()

    # ------------------------------------------------------------------ what a submission is
    def cohort_expected(self) -> set[int]:
        return self.cohort

    def round_complete(self) -> bool:
        if not self.cohorts:
            return len(self.submitted) == self.n
        return self.cohort <= self.submitted

    def check_cohort_submission(self, j: int, round_: int, init: bool) -> None:
        """A NEW submission of the round being collected must come from its cohort (or be a late member's
        initial submission); raises Rejected."""
        if init:
            if round_ != self.collecting or j in self.members or (self.collecting == 0 and self._processing < 0):
                raise Rejected("FAILED_PRECONDITION", f"client {j}: an initial submission (init) is for a client "
                               f"that registers after round 0, of the round being collected ({self.collecting}); "
                               + ("it is a member already" if j in self.members else "Join again"))
            return
        if round_ > 0 and j not in self.members:
            raise Rejected("FAILED_PRECONDITION", f"client {j} is not a member of this federation yet: Join again "
                           "(the reply says register) and send its initial submission first")
        if j not in self.cohort:
            raise Rejected("FAILED_PRECONDITION", f"client {j} is not in the cohort of round {round_} "
                           f"(cohort {sorted(self.cohort)[:20]}{' ...' if len(self.cohort) > 20 else ''}): "
                           "wait for a round it is sampled in (an idle Exchange)")

    def check_idle(self, j: int, held: int) -> None:
        if held > self.collecting:
            raise Rejected("FAILED_PRECONDITION", f"client {j} says it holds the W of round {held}; the server is "
                           f"at round {self.collecting}: Join again")
        if j not in self.members and j not in self.registrations and self.collecting > 0:
            raise Rejected("FAILED_PRECONDITION", f"client {j} is not a member of this federation: Join again "
                           "(the reply says register)")

    # ------------------------------------------------------------------ processing (compute thread / under the lock)
    def cohort_round_applied(self, k: int, present: list[int]) -> None:
        """Round k was aggregated: the members of round 0, the drops, and the registrations that arrived."""
        if k == 0:
            self.members = set(present)
            self.cohort_of[0] = list(present)
            for j in present:
                self.held[j] = 0
        else:
            missing = sorted(self.cohort - set(present))
            if missing:
                self.dropped[k] = missing
            self.deadlines.add_round(self.round_times)
            self.round_times = []

    def set_members_count(self, present: list[int]) -> None:
        """Round 0's mean is over the clients present (they become the members)."""
        self.state.n = max(1, len(present))

    def apply_registrations(self) -> None:
        """Clients that sent their initial submission since the last round: members from now on (compute thread)."""
        if not self.registrations:
            return
        regs, self.registrations = self.registrations, {}
        self.state.register(regs)
        for j in sorted(regs):
            self.members.add(j)
            log.info("client %d is a member now (%d members)", j, len(self.members))

    def _quorum(self) -> int:
        return max(1, self.opts.min_cohort or 1)

    def sample_now(self, k: int) -> list[int] | None:
        """The cohort of round k, drawn when round k-1 is processed (before its step); None when fewer
        than --min-cohort members are eligible (`wait_quorum`)."""
        el = self.eligible()
        if len(el) < self._quorum():
            return None
        return self._draw(k, el)

    def _draw(self, k: int, el: list[int]) -> list[int]:
        m = min(len(el), clients_per_round(self.cfg.participation, max(1, len(self.members))))
        return sample_cohort(self.cfg.seed, k, el, m) if el else []

    async def wait_quorum(self, k: int) -> list[int]:
        """Wait (lock free) until --min-cohort members are eligible, up to the round deadline; then draw
        round k's cohort from those there (--on-deadline proceed) or raise Rejected (fail)."""
        want, limit = self._quorum(), self.opts.round_deadline
        log.warning("round %d: %d eligible client(s), --min-cohort is %d; waiting for clients%s", k,
                    len(self.eligible()), want, "" if limit is None else f" up to {limit:g} s")
        t0 = time.monotonic()
        while True:
            if self.registrations:  # clients registering meanwhile count towards the quorum
                async with self._lock:
                    regs, self.registrations = self.registrations, {}
                    await self._run(self.state.register, regs)
                    self.members |= set(regs)
            el = self.eligible()
            if len(el) >= want:
                return self._draw(k, el)
            if self.stopping or self.failed is not None:
                raise Rejected("ABORTED", "the run stopped while waiting for --min-cohort clients")
            if limit is not None and time.monotonic() - t0 >= limit:
                if self.opts.on_deadline == "proceed":
                    log.warning("round %d: proceeding with %d eligible client(s) (--on-deadline proceed)", k, len(el))
                    return self._draw(k, el)
                raise Rejected("ABORTED", f"round {k}: only {len(el)} eligible client(s) after {limit:g} s, fewer "
                               f"than --min-cohort {want} (--on-deadline fail)")
            await asyncio.sleep(QUORUM_POLL_S)

    def needs_full_w(self, k: int, cohort: list[int]) -> bool:
        """Whether a member of round k's cohort will need W_{k-1} whole (its replay costs more, or is gone)."""
        for j in cohort:
            s = self.held.get(j, -1)
            if s < k - 1 and self._replay(s, k) is None:
                return True
        return False

    def snapshot_full_w(self, k: int) -> None:
        """W_{k-1} (the server's W before round k's step) as identity frames, for round k's catch-ups."""
        ident = parse_spec("identity")
        self.full_w = (k, Plan.build(k, [ident.encode(w, 0) for w in self.state.W]))

    def _replay(self, s: int, k: int) -> list[Plan] | None:
        """S_{s+1}..S_{k-1} when the window has them all and they cost no more than one full W, else None."""
        plans = [self.history.get(i) for i in range(s + 1, k)]
        if any(p is None or p.released for p in plans):
            return None
        if sum(p.payload for p in plans) > self.full_w_bytes:
            return None
        return plans

    def remember(self, plan: Plan) -> None:
        """S_k joins the replay window; the oldest leave it once the rest alone exceed one full W."""
        if plan.done:
            return
        self.history[plan.round] = plan
        total = 0
        for r in sorted(self.history, reverse=True):
            total += self.history[r].payload
            if total > self.full_w_bytes + plan.payload:  # S_k itself is never replayed (it is the round's)
                for old in [x for x in self.history if x <= r]:
                    del self.history[old]
                break

    def open_round(self, k: int, cohort: list[int]) -> None:
        """Round k is open: its cohort may submit."""
        self.cohort = set(cohort)
        self.cohort_of[k] = list(cohort)
        if self.full_w is not None and self.full_w[0] != k:
            self.full_w = None

    # ------------------------------------------------------------------ joining
    async def cohort_join_payload(self, s, resume_round: int | None) -> tuple[dict, list[bytes], int]:
        """`Sessions.join_payload` of a cohort run (the caller holds the lock). A member resuming with its own
        state (a `resume_round` between its last applied round and the open one) keeps it; a client that is
        no member yet after round 0 registers (W only, JoinHeader.register); every other member is re-synced
        with W_c and its G_j, and told `idle` unless it is in round c's cohort and has not submitted."""
        c, j = self.collecting, s.client_id
        base = dict(next_round=c)
        if c > self.rounds:
            return {**base, "resync": False}, [], 0
        L = self.last_applied.get(j, -1)
        sub = j in self.submitted
        a = resume_round
        if j in self.members and a is not None and L <= a <= c:
            log.info("client %d resumes with its own state at round %d (server at %d)", j, a, c)
            return {**base, "resync": False}, [], 0
        if c == 0 and not sub and self._processing < 0:
            lengths, chunks = await self.initial_w()
            return {**base, "resync": True, "frame_lengths": lengths}, chunks, sum(lengths)
        if j not in self.members:
            wl, _, chunks = await self._run(self._resync_frames, j, False)
            self.registrations.pop(j, None)
            log.info("client %d joins the federation at round %d: it registers (W sent)", j, c)
            return {**base, "resync": True, "register": True, "frame_lengths": wl}, chunks, sum(wl)
        wl, el, chunks = await self._run(self._resync_frames, j, sub)
        self.held[j] = c
        idle = sub or j not in self.cohort
        log.info("client %d re-synced at round %d (W%s)%s", j, c, " and its G_j" if el else "",
                 "; it waits for a round it is sampled in" if idle else "")
        return ({**base, "resync": True, "submitted": sub, "idle": idle, "frame_lengths": wl,
                 "estimator_frame_lengths": el}, chunks, sum(wl) + sum(el))

    # ------------------------------------------------------------------ replies
    def reply_now(self, j: int, held: int, late: bool) -> CohortReply | None:
        """Client j's reply if it has one now (it is in the open round's cohort and has not submitted it);
        None: keep waiting."""
        if self.held_back:  # the round is being published: its checkpoint is not written yet
            return None
        k = self.collecting
        if k > self.rounds:
            return CohortReply(k, self.last_plan if self.last_plan is not None else Plan.build(k, None), late=late)
        plan = self.last_plan
        if plan is None or plan.round != k or held >= k or j not in self.cohort or j in self.submitted:
            return None
        if held == k - 1:
            return CohortReply(k, plan, late=late)
        replay = self._replay(held, k)
        if replay is not None:
            return CohortReply(k, plan, replay, False, held, late=late)
        if self.full_w is not None and self.full_w[0] == k:
            return CohortReply(k, plan, [self.full_w[1]], True, held, late=late)
        # neither at hand (the window was lost with a server restart, or the client resumed an old checkpoint):
        # W_k itself, which is W_{k-1} + S_k bit for bit (`current_w_reply`)
        return CohortReply(k, plan, [], True, held, late=late, resync=True)

    async def next_reply(self, j: int, held: int, late: bool = False) -> CohortReply:
        """Hold client j's Exchange until it is sampled (module docstring, replies); `wait` after POLL_S."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.poll_s
        while True:
            if self.failed is not None:
                raise Rejected("ABORTED", f"the run was aborted: {self.failed}")
            if self.stopping:
                raise self._stopping_error()
            rep = self.reply_now(j, held, late)
            if rep is not None and rep.resync and rep.catchup_full:
                rep = await self.current_w_reply(rep)
            if rep is not None:
                return rep
            if self._published is None:
                self._published = asyncio.Event()
            ev = self._published
            left = until - loop.time()
            if left <= 0:
                return CohortReply(held, self.last_plan, late=late, wait=True)
            try:
                await asyncio.wait_for(ev.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def current_w_reply(self, rep: CohortReply) -> CohortReply | None:
        """The fallback catch-up: the server's W_k (round k open) as identity frames and no S_k (the client sets
        W and computes round k). Built once per round under the lock, so no step runs meanwhile; None when the
        round moved on (the caller looks again)."""
        async with self._lock:
            k = rep.round
            if self.collecting != k:
                return None
            if self._current_w is None or self._current_w.round != k:
                ident = parse_spec("identity")
                self._current_w = await self._run(lambda: Plan.build(k, [ident.encode(w, 0) for w in self.state.W]))
            return CohortReply(k, Plan(k, False, []), [self._current_w], True, rep.catchup_from, late=rep.late)

    def record_reply(self, rep: CohortReply, j: int, message: int) -> None:
        """A reply was streamed to client j: its bytes, its catch-up, the W it holds now."""
        if rep.wait or rep.resync:
            return
        k = rep.round if not rep.plan.done else rep.round - 1
        if not rep.plan.done:
            self.held[j] = rep.round
        payload = rep.plan.payload + rep.catchup_bytes
        self.ledger.record(k, j, "down", "payload", payload)
        self.ledger.record(k, j, "down", "message", message)
        if rep.catchup:
            self.catchups.setdefault(k, {})[j] = self.catchups.get(k, {}).get(j, 0) + rep.catchup_bytes

    # ------------------------------------------------------------------ the report
    def cohort_facts(self, k: int) -> dict:
        """Round k's federated entries: sampled, dropped, catch-up (totals and per client)."""
        if not self.cohorts or k < 1:
            return {}
        cohort = self.cohort_of.get(k, [])
        dropped = self.dropped.get(k, [])
        cu = self.catchups.get(k, {})
        out = {"sampled": len(cohort), "cohort": list(cohort), "dropped": list(dropped),
               "catchup": sum(cu.values()), "members": len(self.members)}
        if self.cfg.adaptive_deadline is not None:
            out["deadline"] = self.round_deadline_used
        return out

    def client_facts(self, k: int) -> dict[int, dict]:
        """Round k's per-client entries: catch-up bytes and whether it was dropped (for every cohort member)."""
        if not self.cohorts or k < 1:
            return {}
        dropped = set(self.dropped.get(k, []))
        cu = self.catchups.get(k, {})
        return {j: {"catchup": cu.get(j, 0), "dropped": j in dropped} for j in self.cohort_of.get(k, [])}

    def cohort_uncompressed(self, rounds: int) -> dict:
        """What identity fp32 would have sent in this federation, counted as `simulate` counts it: W_0 to
        each member and its initial gradient; per sampled client and round one model down (plus one more
        when it caught up) and, unless it was dropped, one up."""
        full = 4 * self.numel
        init = len(self.cohort_of.get(0, [])) or len(self.members)
        up = init * full if self.cfg.init == "grad" else 0
        down = init * full
        for k in range(1, rounds + 1):
            cohort = self.cohort_of.get(k, [])
            cu = self.catchups.get(k, {})
            down += sum(full + (self.full_w_bytes if cu.get(j) else 0) for j in cohort)
            up += (len(cohort) - len(self.dropped.get(k, []))) * full
        return {"up": up, "down": down}

    def federated_summary(self) -> dict:
        n_drop = sum(len(v) for v in self.dropped.values())
        return {"clients": self.n, "members": len(self.members), "per_round":
                clients_per_round(self.cfg.participation, max(1, len(self.members))),
                "participation": self.cfg.participation or 1.0, "deadline": self.cfg.deadline,
                "adaptive_deadline": self.cfg.adaptive_deadline,
                "dropped": n_drop, "catchup_bytes": sum(sum(v.values()) for v in self.catchups.values()),
                "full_w_bytes": self.full_w_bytes, "client_timeout": self.client_timeout,
                "min_cohort": self.opts.min_cohort or 1}


def mean_estimators(state) -> list[torch.Tensor]:
    """mean_j G_j over the members (tests: it must equal G)."""
    order = sorted(state.estimators)
    out = []
    for i in range(len(state.G)):
        acc = torch.zeros_like(state.G[i])
        for j in order:
            acc.add_(state.estimators[j][i].to(acc.dtype))
        out.append(acc / max(1, len(order)))
    return out

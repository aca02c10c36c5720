"""Who takes part in the run: a client's session, Join (validation, the id, the reply's payload), the
session token check of every later call, and Leave.

`Sessions` is one part of the `Coordinator` (a mixin): the methods here own `sessions` and the cached
initial W; they read the run's position (`collecting`, `submitted`, `pending`, `failed`, `stopping`)
that the other parts keep.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..common.wire import chunking, protocol, raw
from .errors import Rejected
from .options import MAX_NAME_BYTES

if TYPE_CHECKING:
    from ..v1 import service_pb2 as pb

log = logging.getLogger("efmuon.server")


@dataclass
class Session:
    client_id: int
    token: str
    name: str
    confirmed: bool = False  # the Join reply was streamed completely
    left: bool = False
    reason: str = ""  # why it left (Leave's reason), for the deadline's error message


class Sessions:
    """Join, the session check and Leave (part of `Coordinator`, see the module docstring)."""

    def _init_sessions(self) -> None:
        self.sessions: dict[int, Session] = {}
        self._init_w: tuple[list[int], list[bytes]] | None = None  # X_0's chunks, while round 0 is open
        self._init_lock = asyncio.Lock()
        self._all_left = asyncio.Event()

    def check_client_id(self, client_id: int) -> None:
        if not 0 <= client_id < self.n:
            raise Rejected("INVALID_ARGUMENT", f"client id {client_id} is not valid: this run has clients "
                           f"0..{self.n - 1} (workers={self.n})")

    def session(self, client_id: int, token: str) -> Session:
        """The session `token` proves for `client_id` (every call after Join); raises Rejected."""
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
        self._check_hello(version, parameters, name)
        if self.failed is not None:
            raise Rejected("ABORTED", f"the run was aborted: {self.failed}")
        client_id = self._client_id_for(client_id, rejoin)
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

    def _check_hello(self, version: int, parameters: Sequence[pb.ParameterInfo], name: str) -> None:
        """The Join's name, protocol version and model fingerprint."""
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

    def _client_id_for(self, client_id: int | None, rejoin: bool) -> int:
        """The id a Join gets: the one it asks for (free, or taken over with `rejoin`), else the first
        free one (only before round 1)."""
        if self.collecting > self.rounds and client_id is None:
            raise Rejected("FAILED_PRECONDITION", f"the run is finished (all {self.rounds} rounds done)")
        if client_id is None:
            if self.collecting > 0 and not self.cohorts:
                raise Rejected("FAILED_PRECONDITION", f"the run is at round {self.collecting}: re-join it with "
                               "your client id (--client-id J)")
            free = [j for j in range(self.n) if j not in self.sessions]
            if not free:
                raise Rejected("RESOURCE_EXHAUSTED", f"all {self.n} client ids of this run are taken")
            return free[0]
        self.check_client_id(client_id)
        old = self.sessions.get(client_id)
        if old is not None and not old.left and not rejoin:
            raise Rejected("ALREADY_EXISTS", f"client id {client_id} is already held by a live session "
                           f"({old.name or 'unnamed'}); pick another id, or set rejoin to take it over "
                           "(a restarted worker started with --client-id does)")
        return client_id

    async def initial_w(self) -> tuple[list[int], list[bytes]]:
        """Frame lengths and chunks of X_0 (raw float32), built once for every client."""
        async with self._init_lock:
            if self._init_w is None:
                def build():
                    frames = raw.raw_frames(self.state.W)
                    return [len(f) for f in frames], list(chunking.iter_chunks(frames))
                self._init_w = await self._run(build)
            return self._init_w

    async def join_payload(self, s: Session, resume_round: int | None) -> tuple[dict, list[bytes], int]:
        """What the Join reply carries: header fields, chunks and payload bytes (see JoinHeader)."""
        async with self._lock:  # never between a round's aggregate and its step
            if self.cohorts:
                return await self.cohort_join_payload(s, resume_round)
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
            wl, el, chunks = await self._run(self._resync_frames, j, sub)
            log.info("client %d re-synced at round %d (W%s)", j, c, " and its G_j" if el else "")
            return ({**base, "resync": True, "submitted": sub, "frame_lengths": wl, "estimator_frame_lengths": el},
                    chunks, sum(wl) + sum(el))

    def _resync_frames(self, j: int, submitted: bool) -> tuple[list[int], list[int], list[bytes]]:
        """W's and client j's G_j's frame lengths and their chunks (on the compute thread). G_j includes
        the pending submission of a client that `submitted` this round already (ef14: it is G_j)."""
        est = self.state.estimators.float32(j)
        if submitted:
            p = self.pending.get(j)
            if p is not None:
                ef14 = self.cfg.method == "ef14"
                est = [t.clone() for t in p] if (est is None or ef14) else [e.add_(t) for e, t in zip(est, p)]
        wf = raw.raw_frames(self.state.W)
        ef = raw.raw_frames(est) if est is not None else []
        return [len(f) for f in wf], [len(f) for f in ef], list(chunking.iter_chunks(wf + ef))

    def confirm_join(self, s: Session, request_bytes: int, reply_bytes: int, payload: int) -> None:
        """The Join reply was streamed completely: the session is live, its bytes are counted."""
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

    # ------------------------------------------------------------------ leave
    def leave(self, s: Session, last: pb.WireReport | None, reason: str) -> None:
        """Client s leaves; `last` (checked by `check_wire_report`) is its WireReport of its last call."""
        if not s.left:
            self.ledger.record_client_report(s.client_id, last)
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
        if self.cohorts:  # a federation: every client that joined has left (some ids may never come)
            if all(x.left for x in self.sessions.values() if x.confirmed):
                self._all_left.set()
        elif all(self.sessions.get(j) is not None and self.sessions[j].left for j in range(self.n)):
            self._all_left.set()

    def absence_notes(self, missing: Sequence[int]) -> list[str]:
        """Why each client in `missing` did not submit, for the round deadline's error message."""
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
        return notes

    def live_clients(self) -> list[int]:
        """Clients whose Join completed and who have not left (Status's `joined`)."""
        return sorted(j for j, s in self.sessions.items() if s.confirmed and not s.left)

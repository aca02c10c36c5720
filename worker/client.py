"""The worker: any torch model, a loss function and a batch source, driven through the server's rounds.

    from efmuon.worker import Worker

    worker = Worker(model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                    batches=lambda k: my_batch(k),          # or any iterable of batches
                    server="10.0.0.5:50051", client_id=3)
    stats = worker.run()                                     # returns after the server's last round

Each round k the worker applies the server's downlink S_k to its copy of W (W <- W + S_k),
takes the gradient of `loss_fn(model, batch_k)` at W (`common.model.gradients`), and sends
the compressed estimator difference R_j made by `WorkerState.make_uplink` (docs/design.md §1).
Its model must have the server's parameters (names, shapes, dtypes): Join refuses it otherwise.

This module is the round loop (`Worker.run`, `exchange`); the pieces it drives are beside it:
`connection` (the channel, its relay and wire marks), `join` (the Join reply and re-syncs),
`reconnect` (the backoff), `checkpoints` (the worker's own checkpoints) and `task` (`for_task`).

Wire bytes: the server counts what each connection carried (its own sockets), so the channel goes
straight to the server. With `measure_wire=True` (or a shaped link) it goes through an in-process
`CountingRelay` instead, whose counters are read around every call; each call's figures travel to
the server with the next call (and the last in Leave), where they cross-check the server's count
(`wire_client` in the report).

Tracing: `worker.trace = fn` (None by default, settable any time) has `fn(step)` called right after
each step of the loop, with step one of "join", "exchange", "gradients", and "apply_downlink",
"make_uplink", "init_uplink" right after the worker called that WorkerState method. The memory
benchmark reads the process's RSS there; with no hook, a step costs one attribute test.
`worker.events = fn` (None by default) has `fn(what, round, t0, t1)` called (perf_counter times) for
("uplink_frame", k, t0, t1) per uplink frame encoded (worker.uplink: possibly on gRPC's thread, while the
stream is sent), ("uplink_chunk", k, t, t) just before each uplink chunk message goes to gRPC, and
("downlink_frame", k, t0, t1) per downlink frame decoded as it arrived.

Pipelining (docs/design.md "Pipelined rounds"): with a server that pipelines its rounds (`--pipeline`, its
Join reply says so), outside cohort runs and worker checkpoints, the uplink is a `LazyUplink` (encoded
frame by frame while it is sent, in the server's LMO-unit order) and each downlink frame is decoded as
soon as it is complete; W += S once every layer is in. The bits are those of the sequential worker.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import torch

from ..common.algorithm import WorkerState, params_sha256
from ..common.config import RunConfig
from ..common.errors import FrameError, ProtocolError
from ..common.federation import federation_size, runs_cohorts
from ..common.model import gradients, model_specs
from ..common.runtime import configure_torch, resolve_device, return_freed_memory, trim_heap
from ..common.wire import chunking, protocol
from ..v1 import service_pb2 as pb
from .stub import submission_messages
from .checkpoints import Pending, WorkerCheckpoints
from .cohort import ComputeScale, Snapshot, catch_up, expected_frames, split_reply
from .connection import Connection, WorkerError, WorkerStopped, rpc_error, split_address
from .group import lead_gradients
from .join import join_request, receive_join, resynced_state
from .reconnect import (
    CONTACT_RETRY,
    EXCHANGE_WAIT_S,
    JOIN_WAIT_S,
    call_timeout,
    contact_window,
    explained,
    keep_trying,
    rejoin_with_backoff,
    retryable,
)
from .silence import Silence
from .uplink import LazyUplink, StreamedDownlink, lazy_uplink

__all__ = ["Connection", "Worker", "WorkerError", "WorkerStopped", "split_address"]

log = logging.getLogger("efmuon.worker")


class Worker:
    """One client of an efmuon run (see the module docstring).

    model:      any torch.nn.Module; its parameters are overwritten with the server's W.
    loss_fn:    loss_fn(model, batch) -> scalar tensor.
    batches:    a callable batches(round) -> batch (round 0 is the 'grad' initialisation), or an
                iterable of batches, consumed one per round and restarted when exhausted.
    server:     "host:port" of `efmuon server`.
    client_id:  0..n-1, or None to take the lowest free id (it is then `worker.client_id`).
    device:     where W, the momentum, the estimator and the gradients live.
    specs:      the LayerSpecs (norms) of the model; default `model_specs(model, cfg)`.

    trace:      an attribute, not an argument: None, or fn(step) called after each step of the loop
                (the module docstring names the steps); set it any time before or during `run`.
    """

    trace: Callable[[str], None] | None = None  # called with each step's name (module docstring)
    events: Callable[[str, int, float, float], None] | None = None  # timed events (module docstring)
    group = None  # rank 0 of a torch.distributed worker group (worker.group.lead sets it), or None

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                 batches: Callable[[int], Any] | Iterable, server: str | Connection = "127.0.0.1:50051",
                 client_id: int | None = None, device: str | torch.device = "cpu", specs=None,
                 measure_wire: bool | None = None, name: str | None = None, configure_threads: bool = True,
                 rejoin: bool | None = None, checkpoint_dir: str | None = None, reconnect_timeout: float = 300.0,
                 connect_timeout: float | None = None):
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.model = model.to(self.device)
        # before the Join buffers and the WorkerState are allocated (their model copies then come from mmap)
        self._model_bytes = sum(4 * p.numel() for p in self.model.parameters())
        return_freed_memory(self._model_bytes)
        self.loss_fn = loss_fn
        self._batches = batches
        self._batch_iter = None
        self.conn = server if isinstance(server, Connection) else Connection(server, measure_wire)
        self.client_id = client_id
        self.specs = specs
        self.name = name or f"{socket.gethostname()} pid {os.getpid()}"
        self.configure_threads = configure_threads
        self.cfg: RunConfig | None = None
        self.state: WorkerState | None = None
        self.session = ""
        self.history: list[dict] = []  # per call: round, payload/message/wire up and down
        # resilience: a worker given its client id takes it over from an older session (a restart)
        self.rejoin = (client_id is not None) if rejoin is None else bool(rejoin)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoints = WorkerCheckpoints(checkpoint_dir)
        self.reconnect_timeout = float(reconnect_timeout)
        self.connect_timeout = connect_timeout
        self.pending: Pending | None = None  # (round, frames, loss) not yet acknowledged
        self.resyncs = 0
        self.reconnects = 0
        self._wire = None
        self._empty_resend = False
        self._placeholder = False
        self._acknowledged = False  # the server's reply to the pending submission began: its frames are freed
        # cohort runs (worker.cohort): wait for a sampled round (idle Exchange), a registration's initial
        # submission, the state before a submission a deadline may drop, the emulated compute speed
        self.cohorts = False
        self._idle = False
        self._init = False
        self._snapshot: Snapshot | None = None
        self._speed: ComputeScale | None = None
        self._fresh = False  # the next Join asks for the server's state (no resume_round, no checkpoint)
        self.sampled = 0  # rounds this client computed (cohort runs: those it was sampled in)
        self.late = 0  # of which dropped as a straggler
        self.catchup_bytes = 0
        self.pipelined = False  # the server said it pipelines its rounds (Join): so does this worker
        self._down: StreamedDownlink | None = None  # the downlink decoded as it arrives (`_read_reply`)

    def _traced(self, step: str) -> None:
        if self.trace is not None:
            self.trace(step)

    # ------------------------------------------------------------------ batches and gradients
    def _batch(self, round_: int):
        if callable(self._batches):
            return self._batches(round_)
        if self._batch_iter is None:
            self._batch_iter = iter(self._batches)
        try:
            return next(self._batch_iter)
        except StopIteration:
            self._batch_iter = iter(self._batches)
            try:
                return next(self._batch_iter)
            except StopIteration:
                raise WorkerError("the batch iterable is empty") from None

    def _gradients(self, round_: int) -> tuple[float, list[torch.Tensor]]:
        if self.group is not None:  # rank 0 of a worker group: the group's gradient (worker.group)
            out = lead_gradients(self.group, self, round_)
            self._traced("gradients")
            return out
        batch = self._batch(round_)
        self._bind_model()
        out = gradients(self.model, self.state.W, lambda m: self.loss_fn(m, batch))
        self._traced("gradients")
        return out

    def _bind_model(self) -> None:
        """Make the model's parameters views of W (one model copy less per worker, BENCHMARKS.md memory).

        `W += S` then updates the model in place and `training.gradients` skips its copy of W into the
        model. Called whenever W may have been replaced (Join, re-sync, checkpoint restore) and before
        every gradient, so a model shared by several Workers in one process (or replaced W tensors)
        is always rebound, never written through. A parameter whose dtype, shape or device differs from
        W's keeps its own storage and is loaded by copy as before."""
        for p, w in zip(self.model.parameters(), self.state.W):
            if p.data_ptr() != w.data_ptr() and p.dtype == w.dtype and p.shape == w.shape and p.device == w.device:
                p.data = w

    # ------------------------------------------------------------------ joining
    def join_timeout(self) -> float:
        """The deadline of one Join: its wait and the model's bytes twice (W, and G_j of a re-sync)."""
        return call_timeout(JOIN_WAIT_S, 2 * self._model_bytes)

    def join(self, timeout: float | None = None) -> None:
        """Join (or re-join) the run. Keeps this worker's state when the server says it is consistent;
        otherwise takes W and G_j from the server (M_j := G_j: the server does not keep momenta).
        The call ends within `timeout` s, at most `join_timeout()`."""
        self.conn.check_stopped()
        names, params = zip(*self.model.named_parameters())
        client_id = self.client_id  # as it was: one read from a checkpoint just below is not asked for
        resume = self._resume_round()
        req = join_request(self.name, names, params, client_id, self.rejoin, resume)
        limit = self.join_timeout()
        header, parts = receive_join(self.conn, req, params, limit if timeout is None else min(timeout, limit))
        cfg = protocol.decode_config(header.config).replace(report=None, metrics=None)
        if self.configure_threads and self.cfg is None:
            configure_torch(cfg.threads)
        self.cfg, self.client_id, self.session = cfg, header.client_id, header.session
        self.names = list(names)
        specs = self.specs if self.specs is not None else model_specs(self.model, cfg)
        self.next_round = int(header.next_round)
        self.cohorts = runs_cohorts(cfg)
        self.pipelined = bool(header.pipeline)  # the server steps its rounds pipelined (--pipeline)
        if self.cohorts and self._speed is None:
            self._speed = ComputeScale(cfg, self.client_id, federation_size(cfg))
        if header.resync:
            self._resync(header, parts, [p.shape for p in params], specs)
            self._idle, self._init = bool(header.idle), bool(header.register)
            self._snapshot = None
        elif self.next_round <= cfg.rounds:
            if self.state is None and self.checkpoints.saved is not None:
                self.state, self.pending = self.checkpoints.restore(params, specs, cfg, self.client_id, self.device)
                self._bind_model()
                self._acknowledged = False
            if self.state is None or (self.pending is None and not (self.cohorts and self._idle)):
                raise ProtocolError("the server kept this worker's state, but it has none")
            if self.cohorts and self._acknowledged:  # the reply to it began: the server has it; wait for a round
                self.pending, self._idle = None, True
            log.info("client %d continues from its own state at round %d", self.client_id,
                     self.pending[0] if self.pending is not None else self.state.round)
        self.checkpoints.discard()
        self._fresh = False
        self._wire = self.conn.since_mark(-1)
        self.history.append({"round": "join", "down_payload": parts.total if parts is not None else 0,
                             "wire": None if self._wire is None else {"up": self._wire.up, "down": self._wire.down}})
        log.info("joined as client %d of %d (%d rounds, next round %d)", self.client_id, cfg.workers, cfg.rounds,
                 self.next_round)
        self._traced("join")

    def _resync(self, header: pb.JoinHeader, parts: chunking.Reassembler, shapes: list, specs) -> None:
        """Take the state the server sent (W, and G_j with M_j := G_j); the submission held is dropped."""

        def adopt(state: WorkerState) -> None:
            self.state = state
            self._bind_model()  # frees the model's own parameters now, before M_j and G_j fill up ...
            trim_heap(self._model_bytes)  # ... and returns their heap pages

        resynced_state(header, parts, shapes, specs, self.cfg, self.client_id, self.device, adopt)
        self.pending = None
        self._empty_resend = bool(header.submitted)
        if self.next_round > 0 or header.estimator_frame_lengths:
            self.resyncs += 1
            log.warning("client %d re-synced from the server at round %d (W and G_j; M_j := G_j)",
                        self.client_id, self.next_round)

    def _resume_round(self) -> int | None:
        """The round of the submission this worker holds (its state is at that round), or None."""
        if self._fresh:  # re-sync from the server (it said its state cannot be brought up to date)
            return None
        if self.cohorts and self.state is not None and (self._idle or (self.pending is not None and self._acknowledged)):
            return self.state.round  # waiting for a sampled round: it holds the W of that round
        if self.state is not None and self.pending is not None:
            if self._placeholder:  # an empty resend after a re-sync: the server may have lost the real one
                return None
            if self._acknowledged:
                # The frames were freed when the reply began (`exchange`): only a server that applied
                # round k can take this state back, and it does for k + 1 only (it is then collecting
                # round k + 1 and our last applied round is k); the resend of round k, empty, is a
                # duplicate of its last round and fetches the reply again. A server that restarted
                # from an older checkpoint re-syncs us instead of asking for frames we no longer have.
                return self.pending[0] + 1
            return self.pending[0]
        if self.state is None:
            saved = self.checkpoints.resume_from(self.client_id)
            if saved is not None:
                if self.client_id is None:
                    self.client_id = saved[0]
                return saved[1]
        return None

    # ------------------------------------------------------------------ one round on the wire
    def exchange(self, round_: int, frames: list[bytes] | LazyUplink, train_loss: float, idle: bool = False,
                 init: bool = False, decode: bool = False) -> tuple[pb.DownlinkHeader, list]:
        """Send this round's frames; return the reply's header and S's frames (`decode`: S itself, each
        layer decoded as soon as its frame is in, `WorkerState.decode_downlink`).

        `frames` is a list, or a `LazyUplink` (worker.uplink) whose frames are encoded while the stream is
        sent, in its order (`frame_order`); should the call fail, its frames not yet sent are encoded then,
        so the pending submission is whole and a resend sends the same bytes.
        The server replies only once it has applied the round, so when the reply's header arrives (and
        it is not a re-sync) the frames can never be needed again: a list `frames` is emptied then
        (the pending submission shares it), which frees one model copy before the downlink is
        reassembled (BENCHMARKS.md, memory). `_resume_round` accounts for it after a lost connection.
        The call's deadline is the barrier's wait plus its bytes (`reconnect.call_timeout`)."""
        self.conn.check_stopped()
        lazy = isinstance(frames, LazyUplink)
        lengths = frames.lengths if lazy else [len(f) for f in frames]
        up_payload = sum(lengths)
        timeout = call_timeout(EXCHANGE_WAIT_S, up_payload + self._model_bytes)
        h = pb.SubmissionHeader(client_id=self.client_id, session=self.session, round=round_,
                                frame_lengths=lengths, train_loss=train_loss, idle=idle, init=init,
                                frame_order=(frames.order or []) if lazy else [])
        if self._wire is not None and not idle:
            h.previous.CopyFrom(self._wire)
        sizes: list[int] = []
        events = self.events
        sending = None if events is None else (lambda: events("uplink_chunk", round_, *(time.perf_counter(),) * 2))
        try:
            with Silence(self.conn) as silence:
                try:
                    stream = submission_messages(h, frames.stream() if lazy else frames, sizes, sending)
                    call = self.conn.stub.Exchange(stream, timeout=timeout, metadata=self.conn.metadata)
                    silence.watch(call)
                    header, parts, down_message = self._read_reply(call, frames, decode)
                except grpc.RpcError as exc:
                    raise silence.failure(f"Exchange of round {round_}", exc) from None
        except Exception:
            self._down = None  # a downlink decoded in part
            if lazy:  # every frame encoded exactly once, whatever became of the call (the resend's bytes)
                frames.finish()
            raise
        if header is None:
            raise ProtocolError(f"the server closed the Exchange of round {round_} without a reply")
        if not idle:
            self._wire = self.conn.since_mark(round_)
        self.history.append({
            "round": round_, "up": {"payload": up_payload, "message": sum(sizes)},
            "down": {"payload": parts.total, "message": down_message},
            "wire": None if self._wire is None else {"up": self._wire.up, "down": self._wire.down}})
        self._traced("exchange")
        down, self._down = self._down, None
        return header, down.result(parts) if down is not None else parts.frames()

    def _read_reply(self, call, frames, decode: bool = False) -> tuple[pb.DownlinkHeader | None, chunking.Reassembler, int]:
        """The Exchange reply: its header (None when there was none), S's frames and the messages' bytes.
        Empties `frames` once the header says the round was applied (`exchange`). `decode`: each frame of S
        is decoded as soon as it is complete (`self._down`, a `StreamedDownlink`), its buffer freed."""
        header, parts, down_message = None, None, 0
        try:
            for msg in call:
                if header is None:
                    down_message += msg.ByteSize()
                    if msg.WhichOneof("part") != "header":
                        raise ProtocolError("the server's Exchange reply did not start with a header")
                    header = msg.header
                    if not header.resync and isinstance(frames, LazyUplink):
                        frames.release()
                        if self.pending is not None and self.pending[1] is frames:  # as a list's: emptied
                            self.pending = (self.pending[0], [], self.pending[2])
                        self._acknowledged = True
                    elif not header.resync and isinstance(frames, list):
                        frames.clear()
                        self._acknowledged = True
                    layers = len(self.state.W)
                    parts = chunking.Reassembler(expected_frames(header), None if header.catchup_frame_lengths
                                                 else (0, layers))
                    if decode and not (header.resync or header.done or header.catchup_frame_lengths):
                        self._down = StreamedDownlink(self.state, header.round, self.events)
                elif msg.WhichOneof("part") == "chunk":
                    chunk = msg.chunk  # a view (ReceivedChunk) or, for an odd encoding, a copy: read once
                    down_message += chunking.received_chunk_size(msg, len(chunk))
                    parts.add(chunk)
                    if self._down is not None:
                        self._down.take(parts)
                else:
                    down_message += msg.ByteSize()
        except (FrameError, ProtocolError):
            call.cancel()
            raise
        return header, parts, down_message

    def leave(self, reason: str = "") -> None:
        req = pb.LeaveRequest(client_id=self.client_id or 0, session=self.session, reason=reason[:4096])
        if self._wire is not None and not reason:
            req.last.CopyFrom(self._wire)
        try:
            self.conn.stub.Leave(req, timeout=30, metadata=self.conn.metadata)
        except grpc.RpcError as exc:
            raise rpc_error("Leave", exc) from None

    def _leave_quietly(self, reason: str) -> None:
        if not self.session:
            return
        try:
            self.leave(reason or "error")
        except Exception:  # noqa: BLE001 - we are already failing; the server logs what it got
            pass

    # ------------------------------------------------------------------ the loop
    def _next_submission(self) -> None:
        """Compute the submission of round state.round (0: the initial one) and keep it as pending."""
        k = self.state.round
        self._placeholder = self._acknowledged = False
        if self._empty_resend:  # the server already has this round's submission (we re-synced after it)
            self.pending, self._empty_resend, self._placeholder = (k, [], math.nan), False, True
            return
        if k == 0 or self._init:  # the initial submission (cohort runs: also of a client registering late)
            if self.cfg.init == "grad":
                loss, g = self._gradients(0)
                frames = self.state.init_uplink(g, consume=True)
                self._traced("init_uplink")
            else:
                loss, frames = math.nan, []
        else:
            if self.cohorts and (self.cfg.deadline is not None or self.cfg.adaptive_deadline is not None):
                # a deadline may drop it: keep M_j, G_j
                self._snapshot = Snapshot(self.state, k)
            t0 = time.perf_counter()
            loss, g = self._gradients(k)
            if self.pipelined and not (self.cohorts or self.checkpoint_dir):  # (a checkpoint saves the frames)
                frames = lazy_uplink(self.state, g, self.cfg, self.events)  # encoded while sent (worker.uplink)
            else:
                frames = self.state.make_uplink(g, consume=True)
            self._traced("make_uplink")
            del g
            if self._speed is not None:
                self._speed.pad(time.perf_counter() - t0)
            self.sampled += 1
        self.pending = (k, frames, loss)
        self.checkpoints.save(self.state, self.client_id, self.pending)

    def _reconnect(self, why: WorkerError) -> None:
        """Re-join with backoff until the server answers (e.g. it restarted from a checkpoint)."""
        self.session = ""
        rejoin_with_backoff(lambda left: self.join(timeout=left), why, self.reconnect_timeout, self.client_id,
                            self.conn)
        self.reconnects += 1

    def _first_join(self) -> None:
        """The first Join, tried again while the server is not up yet (for up to
        `reconnect.contact_window`); a TLS mistake or a refusal fails at once."""
        window = contact_window(self.reconnect_timeout, self.connect_timeout)
        keep_trying(lambda left: self.join(timeout=left), window, self.conn, CONTACT_RETRY,
                    lambda cause, exc: f"{cause.message if cause is not None else exc} (tried for {window:g} s)")

    def _round(self) -> bool:
        """One round: submit (computing the submission if none is pending), take the downlink.
        False when the run is over for this worker."""
        self.conn.check_stopped()
        if self.next_round > self.cfg.rounds:
            return False  # the run finished while we were away
        if self.cohorts:
            return self._cohort_round()
        if self.pending is None:
            self._next_submission()
        k, frames, loss = self.pending
        try:
            header, S = self.exchange(k, frames, loss, decode=self.pipelined)
        except WorkerError as exc:
            if isinstance(exc, WorkerStopped) or self.conn.stopped is not None:
                raise WorkerStopped(self.conn.stopped) from None
            if not retryable(exc, self.reconnect_timeout, self.client_id):
                raise explained(exc, self.conn) from None
            self._reconnect(exc)
            return True
        if header.resync:  # the round closed without us: take W and G_j from the server
            self.pending, self.state = None, None
            self.session = ""
            self.join()
            return True
        if header.done:
            return False
        if header.round != k + 1:
            raise ProtocolError(f"the server sent the downlink of round {header.round} after round {k}")
        self.pending = None
        if self.pipelined:
            self.state.add_downlink(S)  # state.round = k + 1 (S decoded as it arrived, `exchange`)
        else:
            self.state.apply_downlink(S, consume=True)  # state.round = k + 1
        self._traced("apply_downlink")
        self.next_round = k + 1
        del S
        # gRPC buffers a large downlink in small (heap) pieces when it arrives faster than it is
        # read; freed, they would stay resident under the gradient's (mmapped) model copy
        trim_heap(self._model_bytes)
        return True

    def _cohort_round(self) -> bool:
        """One Exchange of a cohort run (worker.cohort): submit (or, not sampled, wait with an idle Exchange),
        then act on the reply: late (restore), wait, done, or the next sampled round with its catch-up."""
        idle = self._idle
        if not idle and self.pending is None:
            self._next_submission()
        k, frames, loss = (self.state.round, [], math.nan) if idle else self.pending
        init = self._init and not idle
        try:
            header, parts = self.exchange(k, frames, loss, idle=idle, init=init)
        except WorkerError as exc:
            if not retryable(exc, self.reconnect_timeout, self.client_id):
                raise explained(exc, self.conn) from None
            self._reconnect(exc)
            return True
        if header.resync:  # the server cannot bring this state up to date: take W and G_j from it
            self.pending, self.state, self._idle, self._snapshot = None, None, False, None
            self.session = ""
            self._fresh = True  # not from this worker's checkpoint either: it is what the server refused
            self.join()
            return True
        self.pending, self._init, self._idle = None, False, True  # the server has the submission (or the wait)
        if header.late:
            self.late += 1
            snap, self._snapshot = self._snapshot, None
            if snap is None or snap.round != k:
                log.warning("client %d: round %d came in late and this worker has no state from before it; "
                            "re-syncing", self.client_id, k)
                self.state, self.session = None, ""
                self.join()
                return True
            snap.restore(self.state)  # a straggler keeps the state it had before the round (simulate's rule)
        else:
            self._snapshot = None
        if header.done:
            return False
        if header.wait:
            return True
        catchup, S = split_reply(header, parts)
        self.catchup_bytes += sum(map(len, catchup))
        catch_up(self.state, header, catchup)  # W_{round-1} (or W_round itself: no S follows)
        del catchup
        if self.state.round != header.round:
            self.state.apply_downlink(S, consume=True)  # state.round = header.round
        self._traced("apply_downlink")
        del S
        self.next_round = int(header.round)
        self._idle = False
        trim_heap(self._model_bytes)
        return True

    def run(self) -> dict:
        """Join, then run every round until the server says done; Leave. Returns this worker's stats.

        When the connection fails or the server restarts, the worker re-joins with backoff (up to
        `reconnect_timeout` seconds) and resends the submission it holds, or is re-synced."""
        try:
            self._first_join()
            while self._round():
                pass
            try:
                self.leave()
            except WorkerError as exc:  # the run is done; a lost goodbye only loses the last wire figures
                log.warning("client %s: %s", self.client_id, exc)
            return self.stats()
        except (FrameError, ProtocolError) as exc:
            self._leave_quietly(str(exc))
            raise WorkerError(f"client {self.client_id}: {exc}") from None
        except BaseException as exc:
            self._leave_quietly(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.conn.close()

    def stop(self, reason: str) -> None:
        """Ask `run`, running in another thread, to end: the call in flight is cancelled, the worker leaves
        the run (Leave with `reason`) and `run` raises WorkerStopped (`Connection.stop`)."""
        self.conn.stop(reason)

    def stats(self) -> dict:
        rounds = [h for h in self.history if h["round"] != "join"]
        up = sum(h["up"]["payload"] for h in rounds)
        down = sum(h["down"]["payload"] for h in rounds)
        wires = [h["wire"] for h in self.history if h["wire"] is not None]
        return {"client_id": self.client_id, "rounds": max(0, len(rounds) - 1), "sampled": self.sampled,
                "late": self.late, "catchup_bytes": self.catchup_bytes,
                "payload": {"up": up, "down": down},
                "wire": {"up": sum(w["up"] for w in wires), "down": sum(w["down"] for w in wires)} if wires else None,
                "w_sha256": params_sha256(self.state.W, self.names) if self.state is not None else None,
                "history": self.history, "transfers": self.conn.transfers}

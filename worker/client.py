"""The worker: any torch model, a loss function and a batch source, driven through the server's rounds.

    from efmuon.worker import Worker

    worker = Worker(model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                    batches=lambda k: my_batch(k),          # or any iterable of batches
                    server="10.0.0.5:50051", client_id=3)
    stats = worker.run()                                     # returns after the server's last round

Each round k the worker applies the server's downlink S_k to its copy of W (W <- W + S_k),
takes the gradient of `loss_fn(model, batch_k)` at W (`common.training.gradients`), and sends
the compressed estimator difference R_j made by `WorkerState.make_uplink` (DESIGN.md section 1).
Its model must have the server's parameters (names, shapes, dtypes): Join refuses it otherwise.

Wire bytes: unless `measure_wire=False`, the gRPC channel goes through an in-process
`CountingRelay`, whose counters are read around every call; each call's figures travel to the
server with the next call (and the last in Leave), so the server's report has them per round.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import torch

from ..common.algorithm import WorkerState, params_sha256
from ..common.checkpoint import (
    latest_checkpoint,
    load_worker,
    restore_worker,
    save_worker,
)
from ..common.config import RunConfig
from ..common.errors import EfmuonError, FrameError, ProtocolError
from ..common.model import Setup, gradients, model_specs
from ..common.runtime import (
    configure_torch,
    resolve_device,
    return_freed_memory,
    trim_heap,
)
from ..common.wire import chunking, protocol
from ..v1 import service_pb2 as pb
from . import stub
from .relay import CountingRelay
from .security import make_channel

log = logging.getLogger("efmuon.worker")


class WorkerError(EfmuonError):
    """The server refused the worker, or the connection failed; the message says which."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise WorkerError(f"server address {address!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    return host.strip("[]"), int(port)


def _rpc_error(what: str, exc: grpc.RpcError) -> WorkerError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "ERROR"
    return WorkerError(f"{what} failed ({name}): {details}", code)


class Connection:
    """A gRPC channel to the server, through a byte-counting relay when `measure_wire`."""

    def __init__(self, server: str, measure_wire: bool = True, link=None, security=None):
        self.server = server
        self.security = security  # worker.security.Security: TLS and/or a bearer token (None: neither)
        host, port = split_address(server)
        self.relay = None
        self.link = link  # a LinkProfile or spec the relay shapes this connection with (None: unshaped)
        self.transfers: list[dict] = []  # per call: {"exchange", "up": [bytes, s] | None, "down": ...}
        target = server
        if measure_wire or link is not None:

            self.relay = CountingRelay(host, port, link=link)
            lhost, lport = self.relay.start()
            target = f"{lhost}:{lport}"

        self.channel = make_channel(target, host, security)
        self.metadata = security.metadata() if security is not None else ()
        self.stub = stub.client_stub(self.channel)  # chunk messages sent pre-serialized, read as views
        self._mark = self.counters()

    def counters(self) -> dict[str, int] | None:
        return self.relay.counters() if self.relay is not None else None

    def since_mark(self, exchange: int) -> pb.WireReport | None:
        """Bytes the connection carried since the last call of this method, as a WireReport."""
        now = self.counters()
        if now is None:
            return None
        rep = pb.WireReport(exchange=exchange, up=now["up"] - self._mark["up"], down=now["down"] - self._mark["down"])
        self._mark = now
        t = self.relay.take_transfers()  # how long this call's data took (achieved link rate)
        self.transfers.append({"exchange": exchange, "up": t["up"], "down": t["down"]})
        return rep

    def status(self, timeout: float | None = 30.0) -> pb.StatusReply:
        try:
            return self.stub.Status(pb.StatusRequest(), timeout=timeout, wait_for_ready=True, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(f"Status at {self.server}", exc) from None
        finally:
            if self.relay is not None:  # a transfer of its own, not part of the Join that follows
                t = self.relay.take_transfers()
                self.transfers.append({"exchange": "status", "up": t["up"], "down": t["down"]})

    def close(self) -> None:
        self.channel.close()
        if self.relay is not None:
            self.relay.stop()


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
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                 batches: Callable[[int], Any] | Iterable, server: str | Connection = "127.0.0.1:50051",
                 client_id: int | None = None, device: str | torch.device = "cpu", specs=None,
                 measure_wire: bool = True, name: str | None = None, configure_threads: bool = True,
                 rejoin: bool | None = None, checkpoint_dir: str | None = None, reconnect_timeout: float = 300.0):
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
        self.reconnect_timeout = float(reconnect_timeout)
        self.pending: tuple[int, list[bytes], float] | None = None  # (round, frames, loss) not yet acknowledged
        self.resyncs = 0
        self.reconnects = 0
        self._saved = None  # a worker checkpoint read at start: (tensors, manifest)
        self._wire = None
        self._empty_resend = False
        self._placeholder = False
        self._acknowledged = False  # the server's reply to the pending submission began: its frames are freed

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
        batch = self._batch(round_)
        self._bind_model()
        return gradients(self.model, self.state.W, lambda m: self.loss_fn(m, batch))

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

    # ------------------------------------------------------------------ protocol steps
    def join(self) -> None:
        """Join (or re-join) the run. Keeps this worker's state when the server says it is consistent;
        otherwise takes W and G_j from the server (M_j := G_j: the server does not keep momenta)."""
        names, params = zip(*self.model.named_parameters())
        req = pb.JoinRequest(protocol_version=protocol.PROTOCOL_VERSION, client_name=self.name[:256],
                             parameters=protocol.fingerprint(names, params), rejoin=self.rejoin)
        if self.client_id is not None:
            req.client_id = int(self.client_id)
        resume = self._resume_round()
        if resume is not None:
            req.resume_round = resume
        header, parts = None, None
        try:
            for msg in self.conn.stub.Join(req, wait_for_ready=True, metadata=self.conn.metadata):
                if header is None:
                    if msg.WhichOneof("part") != "header":
                        raise ProtocolError("the server's Join reply did not start with a header")
                    header = msg.header
                    lengths = list(header.frame_lengths) + list(header.estimator_frame_lengths)
                    if header.resync and len(header.frame_lengths) != len(params):
                        raise ProtocolError(f"the server's Join reply has {len(header.frame_lengths)} W frames, "
                                            f"the model {len(params)} layers")
                    if header.estimator_frame_lengths and len(header.estimator_frame_lengths) != len(params):
                        raise ProtocolError("the server's Join reply has a G_j of the wrong number of layers")
                    parts = chunking.Reassembler(lengths, limit=8 * sum(p.numel() for p in params) + 1)
                elif msg.WhichOneof("part") == "chunk":
                    parts.add(msg.chunk)
            msg = None
        except grpc.RpcError as exc:
            raise _rpc_error(f"Join at {self.conn.server}", exc) from None
        if header is None:
            raise ProtocolError("the server closed Join without a reply")
        if header.protocol_version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"the server speaks protocol version {header.protocol_version}, "
                                f"this worker {protocol.PROTOCOL_VERSION}")
        cfg = protocol.decode_config(header.config).replace(report=None, metrics=None)
        if self.configure_threads and self.cfg is None:
            configure_torch(cfg.threads)
        self.cfg, self.client_id, self.session = cfg, header.client_id, header.session
        self.names = list(names)
        specs = self.specs if self.specs is not None else model_specs(self.model, cfg)
        self.next_round = int(header.next_round)
        shapes = [p.shape for p in params]
        if header.resync:
            frames = parts.frames()
            p = len(params)
            # W (and G_j) alias the reassembled Join buffer (writable, owned by nobody else): no copy
            W = protocol.tensors_from_raw(frames[:p], shapes)
            self.state = WorkerState(W, specs, cfg, self.client_id, device=self.device, copy=False)
            del W
            self._bind_model()  # frees the model's own parameters now, before M_j and G_j fill up ...
            trim_heap(self._model_bytes)  # ... and returns their heap pages
            if header.estimator_frame_lengths:  # re-sync: G_j from the server, M_j := G_j
                G = protocol.tensors_from_raw(frames[p:], shapes)
                self.state.Gj = [g.to(self.device) for g in G]
                self.state.M = [g.to(self.device).clone() for g in G]
                del G
            del frames
            self.state.round = self.next_round
            self.pending = None
            self._empty_resend = bool(header.submitted)
            if self.next_round > 0 or header.estimator_frame_lengths:
                self.resyncs += 1
                log.warning("client %d re-synced from the server at round %d (W and G_j; M_j := G_j)",
                            self.client_id, self.next_round)
        elif self.next_round <= cfg.rounds:
            if self.state is None and self._saved is not None:
                self._restore_checkpoint(params, specs, cfg)
            if self.state is None or self.pending is None:
                raise ProtocolError("the server kept this worker's state, but it has none")
            log.info("client %d continues from its own state at round %d", self.client_id, self.pending[0])
        self._saved = None
        self._wire = self.conn.since_mark(-1)
        self.history.append({"round": "join", "down_payload": parts.total if parts is not None else 0,
                             "wire": None if self._wire is None else {"up": self._wire.up, "down": self._wire.down}})
        log.info("joined as client %d of %d (%d rounds, next round %d)", self.client_id, cfg.workers, cfg.rounds,
                 self.next_round)

    def _resume_round(self) -> int | None:
        """The round of the submission this worker holds (its state is at that round), or None."""
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
        if self.state is None and self.checkpoint_dir and self._saved is None:

            if latest_checkpoint(self.checkpoint_dir) is not None:
                self._saved = load_worker(self.checkpoint_dir)
                log.info("found a worker checkpoint of round %d in %s", self._saved[1]["round"], self.checkpoint_dir)
        if self.state is None and self._saved is not None:
            if self.client_id is not None and self._saved[1]["client_id"] != self.client_id:
                raise WorkerError(f"the checkpoint in {self.checkpoint_dir} belongs to client "
                                  f"{self._saved[1]['client_id']}, this worker is client {self.client_id}")
            if self.client_id is None:
                self.client_id = int(self._saved[1]["client_id"])
            return int(self._saved[1]["round"])
        return None

    def _restore_checkpoint(self, params, specs, cfg) -> None:

        tensors, m = self._saved
        state = WorkerState(list(params), specs, cfg, self.client_id, device=self.device)
        restore_worker(state, self._saved)
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
        self.state = state
        self._bind_model()
        self.pending = (int(m["round"]), frames, math.nan if loss is None else float(loss))
        self._acknowledged = False
        log.warning("client %d resumed from its checkpoint %s (round %d)", self.client_id, m.get("path"), m["round"])

    def _save_checkpoint(self) -> None:
        if not self.checkpoint_dir or self.pending is None:
            return

        k, frames, loss = self.pending
        blob = b"".join(bytes(f) for f in frames)
        save_worker(self.checkpoint_dir, self.state, self.client_id,
                    extra={"frame_lengths": [len(f) for f in frames], "train_loss": loss if math.isfinite(loss) else None},
                    extra_tensors={"frames": torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob
                                   else torch.zeros(0, dtype=torch.uint8)}, keep=2)

    def exchange(self, round_: int, frames: list[bytes], train_loss: float) -> tuple[pb.DownlinkHeader, list]:
        """Send this round's frames; return the reply's header and S's frames.

        The server replies only once it has applied the round, so when the reply's header arrives (and
        it is not a re-sync) the frames can never be needed again: a list `frames` is emptied then
        (the pending submission shares it), which frees one model copy before the downlink is
        reassembled (BENCHMARKS.md, memory). `_resume_round` accounts for it after a lost connection."""
        up_payload = sum(map(len, frames))
        h = pb.SubmissionHeader(client_id=self.client_id, session=self.session, round=round_,
                                frame_lengths=[len(f) for f in frames], train_loss=train_loss)
        if self._wire is not None:
            h.previous.CopyFrom(self._wire)
        sizes: list[int] = []
        header, parts, down_message = None, None, 0
        try:
            for msg in self.conn.stub.Exchange(stub.submission_messages(h, frames, sizes), metadata=self.conn.metadata):
                if header is None:
                    down_message += msg.ByteSize()
                    if msg.WhichOneof("part") != "header":
                        raise ProtocolError("the server's Exchange reply did not start with a header")
                    header = msg.header
                    if not header.resync and isinstance(frames, list):
                        frames.clear()
                        self._acknowledged = True
                    parts = chunking.Reassembler(header.frame_lengths, (0, len(self.state.W)))
                elif msg.WhichOneof("part") == "chunk":
                    chunk = msg.chunk  # a view (ReceivedChunk) or, for an odd encoding, a copy: read once
                    down_message += chunking.received_chunk_size(msg, len(chunk))
                    parts.add(chunk)
                else:
                    down_message += msg.ByteSize()
            msg = chunk = None
        except grpc.RpcError as exc:
            raise _rpc_error(f"Exchange of round {round_}", exc) from None
        if header is None:
            raise ProtocolError(f"the server closed the Exchange of round {round_} without a reply")
        self._wire = self.conn.since_mark(round_)
        self.history.append({
            "round": round_, "up": {"payload": up_payload, "message": sum(sizes)},
            "down": {"payload": parts.total, "message": down_message},
            "wire": None if self._wire is None else {"up": self._wire.up, "down": self._wire.down}})
        return header, parts.frames()

    def leave(self, reason: str = "") -> None:
        req = pb.LeaveRequest(client_id=self.client_id or 0, session=self.session, reason=reason[:4096])
        if self._wire is not None and not reason:
            req.last.CopyFrom(self._wire)
        try:
            self.conn.stub.Leave(req, timeout=30, metadata=self.conn.metadata)
        except grpc.RpcError as exc:
            raise _rpc_error("Leave", exc) from None

    # ------------------------------------------------------------------ reconnecting
    _RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION}

    def _retryable(self, exc: WorkerError) -> bool:
        if exc.code not in self._RETRY or self.reconnect_timeout <= 0 or self.client_id is None:
            return False
        # our id was taken over by another process: do not fight over it
        return "another process holds this client id" not in str(exc)

    def _reconnect(self, why: WorkerError) -> None:
        """Re-join with backoff until the server answers (e.g. it restarted from a checkpoint)."""
        import time

        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.2
        log.warning("client %s: %s; reconnecting (up to %.0f s)", self.client_id, why, self.reconnect_timeout)
        self.session = ""
        while True:
            try:
                self.join()
                self.reconnects += 1
                return
            except WorkerError as exc:
                if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if time.monotonic() + delay > deadline:
                    raise WorkerError(f"client {self.client_id}: the server did not come back within "
                                      f"{self.reconnect_timeout:.0f} s: {exc}", exc.code) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------------ the loop
    def _next_submission(self) -> None:
        """Compute the submission of round state.round (0: the initial one) and keep it as pending."""
        k = self.state.round
        self._placeholder = self._acknowledged = False
        if self._empty_resend:  # the server already has this round's submission (we re-synced after it)
            self.pending, self._empty_resend, self._placeholder = (k, [], math.nan), False, True
            return
        if k == 0:
            if self.cfg.init == "grad":
                loss, g = self._gradients(0)
                frames = self.state.init_uplink(g, consume=True)
            else:
                loss, frames = math.nan, []
        else:
            loss, g = self._gradients(k)
            frames = self.state.make_uplink(g, consume=True)
            del g
        self.pending = (k, frames, loss)
        self._save_checkpoint()

    def run(self) -> dict:
        """Join, then run every round until the server says done; Leave. Returns this worker's stats.

        When the connection fails or the server restarts, the worker re-joins with backoff (up to
        `reconnect_timeout` seconds) and resends the submission it holds, or is re-synced."""
        try:
            self.join()
            while True:
                if self.next_round > self.cfg.rounds:
                    break  # the run finished while we were away
                if self.pending is None:
                    self._next_submission()
                k, frames, loss = self.pending
                try:
                    header, S = self.exchange(k, frames, loss)
                except WorkerError as exc:
                    if not self._retryable(exc):
                        raise
                    self._reconnect(exc)
                    continue
                if header.resync:  # the round closed without us: take W and G_j from the server
                    self.pending, self.state = None, None
                    self.session = ""
                    self.join()
                    continue
                if header.done:
                    break
                if header.round != k + 1:
                    raise ProtocolError(f"the server sent the downlink of round {header.round} after round {k}")
                self.pending = None
                self.state.apply_downlink(S, consume=True)  # state.round = k + 1
                self.next_round = k + 1
                del S
                # gRPC buffers a large downlink in small (heap) pieces when it arrives faster than it is
                # read; freed, they would stay resident under the gradient's (mmapped) model copy
                trim_heap(self._model_bytes)
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

    def _leave_quietly(self, reason: str) -> None:
        if not self.session:
            return
        try:
            self.leave(reason or "error")
        except Exception:  # noqa: BLE001 - we are already failing; the server logs what it got
            pass

    def stats(self) -> dict:
        rounds = [h for h in self.history if h["round"] != "join"]
        up = sum(h["up"]["payload"] for h in rounds)
        down = sum(h["down"]["payload"] for h in rounds)
        wires = [h["wire"] for h in self.history if h["wire"] is not None]
        return {"client_id": self.client_id, "rounds": max(0, len(rounds) - 1),
                "payload": {"up": up, "down": down},
                "wire": {"up": sum(w["up"] for w in wires), "down": sum(w["down"] for w in wires)} if wires else None,
                "w_sha256": params_sha256(self.state.W, self.names) if self.state is not None else None,
                "history": self.history, "transfers": self.conn.transfers}


def for_task(server: str, client_id: int | None = None, device: str | None = None,
             measure_wire: bool = True, link=None, security=None, checkpoint_dir: str | None = None,
             reconnect_timeout: float = 300.0) -> Worker:
    """A Worker for the server's built-in task: the config comes from the server (Status), the task,
    model and layer specs from `Setup(cfg)` exactly as `efmuon simulate` builds them, and the batch of
    round k is `task.batch(client_id, k)`."""

    conn = Connection(server, measure_wire, link=link, security=security)
    try:
        status = conn.status(timeout=max(30.0, reconnect_timeout))  # e.g. restarted while the server restarts
        cfg = protocol.decode_config(status.config).replace(report=None, metrics=None)
        configure_torch(cfg.threads)
        setup = Setup(cfg)
    except BaseException:
        conn.close()
        raise
    task = setup.task
    holder: dict = {}
    worker = Worker(setup.model, task.loss, lambda k: task.batch(holder["w"].client_id, k), server=conn,
                    client_id=client_id, device=device or cfg.device, specs=setup.specs,
                    checkpoint_dir=checkpoint_dir, reconnect_timeout=reconnect_timeout)
    holder["w"] = worker
    return worker

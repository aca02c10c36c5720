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

from efmuon.common.algorithm import WorkerState, params_sha256
from efmuon.common.config import RunConfig
from efmuon.common.errors import EfmuonError, FrameError, ProtocolError
from efmuon.common.training import configure_torch, gradients, model_specs, resolve_device
from efmuon.server import protocol
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc

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

    def __init__(self, server: str, measure_wire: bool = True, link=None):
        self.server = server
        host, port = split_address(server)
        self.relay = None
        self.link = link  # a LinkProfile or spec the relay shapes this connection with (None: unshaped)
        self.transfers: list[dict] = []  # per call: {"exchange", "up": [bytes, s] | None, "down": ...}
        target = server
        if measure_wire or link is not None:
            from efmuon.common.links import CountingRelay

            self.relay = CountingRelay(host, port, link=link)
            lhost, lport = self.relay.start()
            target = f"{lhost}:{lport}"
        self.channel = grpc.insecure_channel(target, options=protocol.CHANNEL_OPTIONS)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
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
            return self.stub.Status(pb.StatusRequest(), timeout=timeout, wait_for_ready=True)
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
                 measure_wire: bool = True, name: str | None = None, configure_threads: bool = True):
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.model = model.to(self.device)
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
        return gradients(self.model, self.state.W, lambda m: self.loss_fn(m, batch))

    # ------------------------------------------------------------------ protocol steps
    def join(self) -> None:
        names, params = zip(*self.model.named_parameters())
        req = pb.JoinRequest(protocol_version=protocol.PROTOCOL_VERSION, client_name=self.name,
                             parameters=protocol.fingerprint(names, params))
        if self.client_id is not None:
            req.client_id = int(self.client_id)
        header, parts = None, None
        try:
            for msg in self.conn.stub.Join(req, wait_for_ready=True):
                if header is None:
                    if msg.WhichOneof("part") != "header":
                        raise ProtocolError("the server's Join reply did not start with a header")
                    header = msg.header
                    parts = protocol.Reassembler(header.frame_lengths, len(params))
                elif msg.WhichOneof("part") == "chunk":
                    parts.add(msg.chunk)
        except grpc.RpcError as exc:
            raise _rpc_error(f"Join at {self.conn.server}", exc) from None
        if header is None:
            raise ProtocolError("the server closed Join without a reply")
        if header.protocol_version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"the server speaks protocol version {header.protocol_version}, "
                                f"this worker {protocol.PROTOCOL_VERSION}")
        cfg = protocol.decode_config(header.config).replace(report=None, metrics=None)
        if self.configure_threads:
            configure_torch(cfg.threads)
        W0 = protocol.tensors_from_raw(parts.frames(), [p.shape for p in params])
        self.cfg, self.client_id, self.session = cfg, header.client_id, header.session
        self.names = list(names)
        specs = self.specs if self.specs is not None else model_specs(self.model, cfg)
        self.state = WorkerState(W0, specs, cfg, self.client_id, device=self.device)
        self.next_round = int(header.next_round)
        self._wire = self.conn.since_mark(-1)
        self.history.append({"round": "join", "down_payload": parts.total,
                             "wire": None if self._wire is None else {"up": self._wire.up, "down": self._wire.down}})
        log.info("joined as client %d of %d (%d rounds)", self.client_id, cfg.workers, cfg.rounds)

    def _requests(self, header: pb.SubmissionHeader, frames: list[bytes], sizes: list):
        first = pb.Submission(header=header)
        sizes.append(first.ByteSize())
        yield first
        for chunk in protocol.iter_chunks(frames):
            msg = pb.Submission(chunk=chunk)
            sizes.append(msg.ByteSize())
            yield msg

    def exchange(self, round_: int, frames: list[bytes], train_loss: float) -> tuple[pb.DownlinkHeader, list]:
        """Send this round's frames; return the reply's header and S's frames."""
        h = pb.SubmissionHeader(client_id=self.client_id, session=self.session, round=round_,
                                frame_lengths=[len(f) for f in frames], train_loss=train_loss)
        if self._wire is not None:
            h.previous.CopyFrom(self._wire)
        sizes: list[int] = []
        header, parts, down_message = None, None, 0
        try:
            for msg in self.conn.stub.Exchange(self._requests(h, frames, sizes)):
                down_message += msg.ByteSize()
                if header is None:
                    if msg.WhichOneof("part") != "header":
                        raise ProtocolError("the server's Exchange reply did not start with a header")
                    header = msg.header
                    parts = protocol.Reassembler(header.frame_lengths, (0, len(self.state.W)))
                elif msg.WhichOneof("part") == "chunk":
                    parts.add(msg.chunk)
        except grpc.RpcError as exc:
            raise _rpc_error(f"Exchange of round {round_}", exc) from None
        if header is None:
            raise ProtocolError(f"the server closed the Exchange of round {round_} without a reply")
        self._wire = self.conn.since_mark(round_)
        self.history.append({
            "round": round_, "up": {"payload": sum(map(len, frames)), "message": sum(sizes)},
            "down": {"payload": parts.total, "message": down_message},
            "wire": None if self._wire is None else {"up": self._wire.up, "down": self._wire.down}})
        return header, parts.frames()

    def leave(self, reason: str = "") -> None:
        req = pb.LeaveRequest(client_id=self.client_id or 0, session=self.session, reason=reason)
        if self._wire is not None and not reason:
            req.last.CopyFrom(self._wire)
        try:
            self.conn.stub.Leave(req, timeout=30)
        except grpc.RpcError as exc:
            raise _rpc_error("Leave", exc) from None

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Join, then run every round until the server says done; Leave. Returns this worker's stats."""
        try:
            self.join()
            k = self.next_round
            if k != 0:
                raise ProtocolError(f"the server expects round {k} first; rejoining a running run is not supported")
            if self.cfg.init == "grad":
                loss, g = self._gradients(0)
                frames = self.state.init_uplink(g)
            else:
                loss, frames = math.nan, []
            while True:
                header, S = self.exchange(k, frames, loss)
                if header.done:
                    break
                if header.round != k + 1:
                    raise ProtocolError(f"the server sent the downlink of round {header.round} after round {k}")
                k += 1
                self.state.apply_downlink(S)
                del S
                loss, g = self._gradients(k)
                frames = self.state.make_uplink(g)
                del g
            self.leave()
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
             measure_wire: bool = True, link=None) -> Worker:
    """A Worker for the server's built-in task: the config comes from the server (Status), the task,
    model and layer specs from `Setup(cfg)` exactly as `efmuon simulate` builds them, and the batch of
    round k is `task.batch(client_id, k)`."""
    from efmuon.common.simulate import Setup

    conn = Connection(server, measure_wire, link=link)
    try:
        status = conn.status()
        cfg = protocol.decode_config(status.config).replace(report=None, metrics=None)
        configure_torch(cfg.threads)
        setup = Setup(cfg)
    except BaseException:
        conn.close()
        raise
    task = setup.task
    holder: dict = {}
    worker = Worker(setup.model, task.loss, lambda k: task.batch(holder["w"].client_id, k), server=conn,
                    client_id=client_id, device=device or cfg.device, specs=setup.specs)
    holder["w"] = worker
    return worker

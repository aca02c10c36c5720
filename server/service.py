"""The grpc.aio servicer: each RPC is parsing, one call into the `Coordinator`, and replying.

Refusals (`Rejected`) become `context.abort(code, message)`; nothing else is decided here.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time

import grpc

from ..common.errors import ConfigError, FrameError
from ..common.wire import chunking, protocol
from ..common.wire.credentials import load_tokens
from ..v1 import service_pb2 as pb
from ..v1 import service_pb2_grpc as pb_grpc
from .auth import (
    ClientCertificateInterceptor,
    TokenAuthInterceptor,
    authenticated_client,
    drain_refused_stream,
    is_authenticated,
    server_credentials,
)
from .coordinator import Coordinator
from .errors import Rejected
from .observability import HEALTH_METHODS, Observability
from .rounds import SubmissionKind
from .wirecount import WireMeter

log = logging.getLogger("efmuon.server")


def count_rejection(coordinator: Coordinator, code: str) -> None:
    """One refused request (by the servicer, or by an auth interceptor before it): Status.rejected and the
    metrics' count by status code."""
    coordinator.rejected += 1
    if coordinator.observer is not None:
        coordinator.observer.rejected(code)


async def _abort(context: grpc.aio.ServicerContext, exc: Rejected, coordinator: Coordinator | None = None) -> None:
    if coordinator is not None:
        count_rejection(coordinator, exc.code)
    await context.abort(grpc.StatusCode[exc.code], str(exc))


def _bound_client(context) -> tuple[bool, int | None]:
    """(token auth on for this call, the client id its token is bound to or None for '*')."""
    return is_authenticated(context), authenticated_client(context)


def _check_token_client(context, client_id: int | None) -> int | None:
    """The client id a call acts as: a client-bound token may only act as its own client."""
    on, bound = _bound_client(context)
    if not on or bound is None:
        return client_id
    if client_id is None:
        return bound
    if client_id != bound:
        raise Rejected("PERMISSION_DENIED", f"this token belongs to client {bound}; it cannot act as client "
                       f"{client_id} (start the worker with --client-id {bound}, or use that client's token)")
    return client_id


def _is_resync(fields: dict) -> bool:
    """A Join answered with the server's current W (and G_j): not the initial W of round 0, nor a client that
    resumes with its own state (of `Coordinator.join_payload`'s replies only a re-sync names `submitted`)."""
    return bool(fields.get("resync")) and "submitted" in fields


class Undecodable:
    """A request whose bytes are not a valid protobuf message (the handler answers INVALID_ARGUMENT)."""

    def __init__(self, kind: str, error: Exception, size: int):
        self.kind, self.error, self.size = kind, error, size

    def WhichOneof(self, _):  # noqa: N802 - looks like a message to code that peeks at it
        return None

    def ByteSize(self) -> int:  # noqa: N802
        return self.size

    def rejected(self) -> Rejected:
        return Rejected("INVALID_ARGUMENT", f"the request is not a valid {self.kind} message "
                        f"({type(self.error).__name__}: {self.error})")


def _safe(cls):
    name = cls.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the peer's bytes are bad
            return Undecodable(name, exc, len(data))
    return deserialize




def add_servicer(servicer: "ParameterServer", server) -> None:
    """Like pb_grpc.add_ParameterServerServicer_to_server, with deserializers that never raise: an
    undecodable message reaches the handler as `Undecodable` and is refused with INVALID_ARGUMENT.
    Exchange's chunk messages arrive as `chunking.ReceivedChunk` views of gRPC's bytes (no copy)."""
    handlers = {
        "Join": grpc.unary_stream_rpc_method_handler(
            servicer.Join, request_deserializer=_safe(pb.JoinRequest),
            response_serializer=pb.JoinReply.SerializeToString),
        "Exchange": grpc.stream_stream_rpc_method_handler(
            servicer.Exchange, request_deserializer=chunking.chunk_deserializer(pb.Submission, _safe(pb.Submission)),
            response_serializer=pb.Downlink.SerializeToString),
        "Leave": grpc.unary_unary_rpc_method_handler(
            servicer.Leave, request_deserializer=_safe(pb.LeaveRequest),
            response_serializer=pb.LeaveReply.SerializeToString),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=_safe(pb.StatusRequest),
            response_serializer=pb.StatusReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("efmuon.v1.ParameterServer", handlers),))
    server.add_registered_method_handlers("efmuon.v1.ParameterServer", handlers)


class ParameterServer(pb_grpc.ParameterServerServicer):
    """The servicer. `wire` counts each call's bytes on the server's own sockets (`wirecount`): every
    Join, Exchange and Leave snapshots its connection when it starts and once its request is complete."""

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        self.wire = WireMeter(coordinator.ledger)

    async def Join(self, request: pb.JoinRequest, context):
        c = self.c
        call = self.wire.start(context.peer())
        if isinstance(request, Undecodable):
            await _abort(context, request.rejected(), c)
            return
        asked = request.client_id if request.HasField("client_id") else None
        try:
            cid = _check_token_client(context, asked)
            s = c.join(cid, request.protocol_version, request.parameters, request.client_name, rejoin=request.rejoin)
        except Rejected as exc:
            log.warning("refused Join (client %s): %s", "?" if asked is None else asked, exc)
            await _abort(context, exc, c)
            return
        self.wire.uplink(call, c.collecting, s.client_id, c.collecting)  # the join phase: both in one round
        if c.collecting > 0:  # a re-join: its next WireReport may count bytes sent before, to a server or
            c.ledger.unmeasured(s.client_id, count=False)  # connection this one could not read
        ok = False
        try:
            resume = request.resume_round if request.HasField("resume_round") else None
            fields, chunks, payload = await c.join_payload(s, resume)
            header = pb.JoinReply(header=pb.JoinHeader(
                client_id=s.client_id, session=s.token, protocol_version=protocol.PROTOCOL_VERSION,
                config=c.config_bytes, workers=c.n, rounds=c.rounds, pipeline=c.pipeline_off is None, **fields,
                **c.shard_fields()))
            sent = header.ByteSize()
            yield header
            for chunk in chunks:
                sent += chunking.chunk_message_size(pb.JoinReply, len(chunk))
                yield pb.JoinReply(chunk=chunk)
            del chunks
            c.confirm_join(s, request.ByteSize(), sent, payload)
            ok = True
            if c.observer is not None and _is_resync(fields):
                c.observer.resynced("Join")
        finally:
            if not ok:
                c.abort_join(s)

    async def Exchange(self, request_iterator, context):
        """A submission (header, then chunks) and its reply: S_{k+1}, a duplicate's reply, or resync."""
        c = self.c
        call = self.wire.start(context.peer())
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            await _abort(context, Rejected("INVALID_ARGUMENT", "empty Exchange: send a Submission header first"), c)
            return
        if c.cohorts:
            async for msg in self._cohort_exchange(context, first, it, call):
                yield msg
            return
        try:
            h, s, kind, plan = await self._submit(context, first, it, call)
        except Rejected as exc:
            log.warning("refused Exchange: %s", exc)
            await drain_refused_stream(it)
            await _abort(context, exc, c)
            return
        if plan is None:  # tell the client to re-join: its estimator on the server did not take this round
            if c.observer is not None:
                c.observer.resynced("Exchange")
            yield pb.Downlink(header=pb.DownlinkHeader(round=h.round + 1, duplicate=True, resync=True))
            return
        duplicate = kind != SubmissionKind.NEW
        chunks = plan.chunks  # taken before the first yield: Plan.release() may rebind plan.chunks later
        header = plan.header(duplicate=duplicate)
        yield header
        for msg in chunks:
            yield msg
        del chunks
        if not duplicate:
            c.record_down(plan, s.client_id, header.ByteSize() + plan.chunk_message_bytes)

    async def _cohort_exchange(self, context, first, it, call):
        """Exchange in a cohort run (server.cohorts): take the submission in (or an idle one), then hold the
        call until the client's next round (with its catch-up), `wait`, `late`, `resync` or `done`."""
        c = self.c
        j = None
        try:
            if isinstance(first, Undecodable):
                raise first.rejected()
            if first.WhichOneof("part") != "header":
                raise Rejected("INVALID_ARGUMENT", "the first Submission of an Exchange must carry the header")
            h = first.header
            _check_token_client(context, h.client_id)
            s = c.session(h.client_id, h.session)
            j = s.client_id
            c.call_started(j)
            late = False
            if h.idle:
                c.check_idle(j, h.round)
                async for _ in it:  # an idle Exchange carries no frames: anything sent is dropped
                    pass
                self.wire.uplink(call, c.collecting, j, c.collecting, now=True)
            else:
                kind = c.classify(s, h.round)
                if h.init and kind in (SubmissionKind.RESYNC, SubmissionKind.LATE):
                    kind = SubmissionKind.NEW  # a registration is not part of the round's barrier
                previous = h.previous if h.HasField("previous") else None
                if kind == SubmissionKind.NEW:
                    c.check_cohort_submission(j, h.round, h.init)
                    c.check_wire_report(h.round, previous, j)
                    frames, total, message = await self._receive(h, it, first.ByteSize())
                    self.wire.uplink(call, h.round, j, h.round + 1, now=True)
                    if h.init:
                        kind = await c.accept_init(s, h.round, frames, h.train_loss)
                    else:
                        kind = await c.accept(s, h.round, frames, h.train_loss, previous, total, message)
                    del frames
                else:
                    async for _ in it:  # a duplicate or a late one: read and drop, never apply
                        pass
                    self.wire.uplink(call, h.round, j, h.round + 1, now=True)
                if kind == SubmissionKind.RESYNC:
                    if c.observer is not None:
                        c.observer.resynced("Exchange")
                    yield pb.Downlink(header=pb.DownlinkHeader(round=h.round + 1, duplicate=True, resync=True))
                    return
                late = kind == SubmissionKind.LATE
            rep = await c.next_reply(j, h.round, late)
        except Rejected as exc:
            log.warning("refused Exchange: %s", exc)
            await drain_refused_stream(it)
            if j is not None:
                c.call_ended(j)
            await _abort(context, exc, c)
            return
        try:
            header = rep.header()
            self.wire.reply_round(call, rep.round, j)
            yield header
            message = header.ByteSize()
            for msg in rep.messages():
                yield msg
            message += rep.plan.chunk_message_bytes + sum(p.chunk_message_bytes for p in rep.catchup) \
                if not (rep.wait or rep.resync) else 0
            c.record_reply(rep, j, message)
        finally:
            c.call_ended(j)

    async def _submit(self, context, first, it, call):
        """Check the header, take a new submission in (or read and drop a duplicate) and wait for the
        reply: (header, session, kind, Plan or None for resync). Raises Rejected."""
        c = self.c
        if isinstance(first, Undecodable):
            raise first.rejected()
        if first.WhichOneof("part") != "header":
            raise Rejected("INVALID_ARGUMENT", "the first Submission of an Exchange must carry the header")
        h = first.header
        _check_token_client(context, h.client_id)
        s = c.session(h.client_id, h.session)
        kind = c.classify(s, h.round)
        previous = h.previous if h.HasField("previous") else None
        if kind == SubmissionKind.NEW:
            c.check_wire_report(h.round, previous, s.client_id)
            c.release_last_reply(s, h.round)
            pipe = c.pipeline_for(h.round)
            if pipe is None:
                frames, total, message = await self._receive(h, it, first.ByteSize())
                self.wire.uplink(call, h.round, s.client_id, h.round + 1, now=True)
                # `frames` holds the only reference to the buffers; accept() empties it after decoding
                kind = await c.accept(s, h.round, frames, h.train_loss, previous, total, message)
                del frames
            else:
                kind = await self._submit_pipelined(h, s, it, first, call, pipe, previous)
        else:
            async for _ in it:  # a duplicate: read and drop, never apply
                pass
            self.wire.uplink(call, h.round, s.client_id, h.round + 1, now=True)
        if kind in (SubmissionKind.NEW, SubmissionKind.PENDING):
            return h, s, kind, await c.result(h.round)
        if kind == SubmissionKind.RESYNC:
            return h, s, kind, None
        return h, s, kind, c.reply_for(kind, h.round)

    async def _submit_pipelined(self, h, s, it, first, call, pipe, previous) -> SubmissionKind:
        """A new submission under --pipeline (server.pipelined): each frame is decoded (and LMO units
        stepped) as it completes; the submission is accepted once all are; refused, its frames are forgotten."""
        c = self.c
        sink = c.frame_sink(pipe, s.client_id, h.round)
        kind = None
        try:
            _, total, message = await self._receive(h, it, first.ByteSize(), sink)
            self.wire.uplink(call, h.round, s.client_id, h.round + 1, now=True)
            try:
                decoded = await sink.finish()
            except FrameError as exc:
                raise Rejected("INVALID_ARGUMENT", f"client {s.client_id} round {h.round}: {exc}; nothing was "
                               "applied, resend a valid submission") from None
            kind = await c.accept(s, h.round, None, h.train_loss, previous, total, message, decoded=decoded)
            return kind
        finally:
            if kind != SubmissionKind.NEW:  # a task of its own: a cancelled call (the client went away) still forgets
                await asyncio.shield(c._spawn(sink.abort()))

    async def _receive(self, h: pb.SubmissionHeader, it, message: int, sink=None) -> tuple[list, int, int]:
        """Reassemble a new submission's chunks: (frames in layer order, their bytes, the messages' bytes).
        The frames arrive in `h.frame_order` (empty: layer order). `sink(layer, frame)`: each frame as soon as
        it is complete (the returned frames are then empty)."""
        c = self.c
        t_first = None
        try:
            parts = chunking.Reassembler(h.frame_lengths, c.expected_frames(h.round), c.frame_limit)
            order = chunking.stream_order(h.frame_order, len(h.frame_lengths))
            async for msg in it:
                if t_first is None:
                    t_first = time.perf_counter()
                if isinstance(msg, Undecodable):
                    raise FrameError(str(msg.rejected()))
                if msg.WhichOneof("part") != "chunk":
                    raise FrameError("a Submission after the first must carry a chunk, not another header")
                chunk = msg.chunk  # a view (ReceivedChunk) or, for an odd encoding, a copy: read once
                if len(chunk) > protocol.CHUNK_BYTES:
                    raise FrameError(f"a chunk of {len(chunk)} bytes: at most {protocol.CHUNK_BYTES}")
                message += chunking.received_chunk_size(msg, len(chunk))
                parts.add(chunk)
                if sink is not None:
                    for i, frame in parts.take_complete():
                        sink(i if order is None else order[i], frame)
            if sink is not None:
                for i, frame in parts.take_complete():  # empty frames after the last byte
                    sink(i if order is None else order[i], frame)
            frames, total = chunking.in_layer_order(parts.frames(), order), parts.total
        except FrameError as exc:
            raise Rejected("INVALID_ARGUMENT", f"client {h.client_id} round {h.round}: {exc}") from None
        if c.events is not None:
            t = time.perf_counter()
            c.events("recv", h.round, t if t_first is None else t_first, t)
        return frames, total, message

    async def Leave(self, request: pb.LeaveRequest, context):
        c = self.c
        call = self.wire.start(context.peer())
        try:
            if isinstance(request, Undecodable):
                raise request.rejected()
            _check_token_client(context, request.client_id)
            s = c.session(request.client_id, request.session)
            if len(request.reason) > 4096:
                raise Rejected("INVALID_ARGUMENT", f"a Leave reason of {len(request.reason)} characters: at most 4096")
            last = request.last if request.HasField("last") else None
            c.check_wire_report(None, last, s.client_id)
        except Rejected as exc:
            await _abort(context, exc, c)
            return pb.LeaveReply()
        self.wire.uplink(call, c.collecting, s.client_id, c.collecting)
        c.leave(s, last, request.reason)
        return pb.LeaveReply()

    async def Status(self, request: pb.StatusRequest, context):
        return self.c.status()


def grpc_options(max_message_bytes: int = protocol.MAX_MESSAGE_BYTES) -> list:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)] + protocol.SERVER_KEEPALIVE_OPTIONS


LISTEN_HELP = ("the port is in use (by another efmuon server or another program) or the host is not an address "
               "of this machine: stop what holds the port or pick another --port (0: any free port), and check --host")


async def start(coordinator: Coordinator, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for `coordinator`; returns it and the bound port (port 0 = any free).

    TLS (`--tls-cert/--tls-key`, mutual with `--tls-ca`) and bearer tokens (`--token-file`) come
    from `coordinator.opts`; under mutual TLS each call must act as the client its certificate names
    (`auth.ClientCertificateInterceptor`). The port is never shared (no SO_REUSEPORT): a port in use
    raises ConfigError, as do a port outside 0..65535 and bad TLS files. The server also answers
    health checks (no token needed) and reflection, and with `opts.metrics_port` serves Prometheus
    metrics on `host` (server.observability; `coordinator.observer`).
    """
    opts = coordinator.opts
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is not a TCP port: give 0..65535 (0: any free port)")
    interceptors = []
    if opts.token_file:
        tokens = load_tokens(opts.token_file)
        bad = sorted({j for j in tokens.values() if j is not None and not 0 <= j < coordinator.n})
        if bad:
            log.warning("token file %s has tokens for client ids %s outside this run's 0..%d", opts.token_file, bad,
                        coordinator.n - 1)
        interceptors.append(TokenAuthInterceptor(tokens, exempt=HEALTH_METHODS))  # probes send no token
    if opts.tls_ca:
        interceptors.append(ClientCertificateInterceptor())
    credentials = server_credentials(opts.tls_cert, opts.tls_key, opts.tls_ca) if opts.tls_cert else None
    # without SO_REUSEPORT a second server cannot bind this port (workers would split between two runs)
    options = [*grpc_options(opts.max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options, interceptors=interceptors or None)
    servicer = ParameterServer(coordinator)
    add_servicer(servicer, server)
    observer = Observability(coordinator)
    await observer.install(server)  # health checking and reflection
    address = f"{host}:{port}"
    try:
        if credentials is not None:
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:  # gRPC's "Failed to bind to address"
        bound = 0
    if not bound:
        raise ConfigError(f"could not listen on {address}: {LISTEN_HELP}")
    servicer.wire.listening(bound)  # the server counts its connections' bytes there (or the clients do)
    if opts.metrics_port is not None:
        observer.serve_metrics(host, opts.metrics_port, opts.tls_cert, opts.tls_key)
    coordinator.observer = observer
    for interceptor in interceptors:  # their refusals count like the servicer's
        interceptor.on_reject = functools.partial(count_rejection, coordinator)
    await server.start()
    coordinator.start()
    return server, bound


async def serve(coordinator: Coordinator, host: str = "127.0.0.1", port: int = 0, on_ready=None,
                grace: float = 2.0) -> dict:
    """Serve until the run is finished or SIGTERM/SIGINT arrives; returns the report.

    `on_ready(port)` is called once the server listens (e.g. to start local workers). It may return
    an awaitable that watches them: if it raises, the run stops (partial report) and the error
    propagates; if it returns, serving simply continues until the run is finished.
    An interrupted run writes a partial report (summary.partial = true) and returns normally.
    """
    server, bound = await start(coordinator, host, port)
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, interrupted.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / not POSIX
            pass
    watcher = None
    waits: set = set()
    try:
        if on_ready is not None:
            r = on_ready(bound)
            if r is not None:
                watcher = asyncio.ensure_future(r)
                waits.add(watcher)
        done = asyncio.ensure_future(coordinator.finished.wait())
        stop = asyncio.ensure_future(interrupted.wait())
        waits |= {done, stop}
        while True:
            ready, waits = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if done in ready or stop in ready or (watcher in ready and watcher.exception() is not None):
                break
        if not coordinator.finished.is_set() or coordinator.failed is not None:
            if interrupted.is_set():
                log.warning("interrupted: stopping the server")
            await coordinator.stop()
    finally:
        for f in waits:
            if f is not watcher:
                f.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.stop(grace)
        await coordinator.observer.close()
        coordinator.executor.shutdown(wait=True, cancel_futures=True)
    if watcher is not None and watcher.done() and watcher.exception() is not None and not interrupted.is_set():
        raise watcher.exception()
    if coordinator.failed is not None and not interrupted.is_set():
        raise coordinator.failed
    return coordinator.report.to_dict()

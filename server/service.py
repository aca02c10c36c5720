"""The grpc.aio servicer: each RPC is parsing, one call into the `Coordinator`, and replying.

Refusals (`Rejected`) become `context.abort(code, message)`; nothing else is decided here.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from efmuon.common.errors import FrameError
from efmuon.server import protocol
from efmuon.server.coordinator import Coordinator, Rejected
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc

log = logging.getLogger("efmuon.server")


async def _abort(context: grpc.aio.ServicerContext, exc: Rejected) -> None:
    await context.abort(grpc.StatusCode[exc.code], str(exc))


class ParameterServer(pb_grpc.ParameterServerServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    async def Join(self, request: pb.JoinRequest, context):
        c = self.c
        try:
            s = c.join(request.client_id if request.HasField("client_id") else None,
                       request.protocol_version, request.parameters, request.client_name)
        except Rejected as exc:
            log.warning("refused Join (client %s): %s",
                        request.client_id if request.HasField("client_id") else "?", exc)
            await _abort(context, exc)
            return
        ok = False
        try:
            lengths, chunks = await c.initial_w()
            header = pb.JoinReply(header=pb.JoinHeader(
                client_id=s.client_id, session=s.token, protocol_version=protocol.PROTOCOL_VERSION,
                config=c.config_bytes, workers=c.n, rounds=c.rounds, next_round=c.collecting,
                frame_lengths=lengths))
            sent = header.ByteSize()
            yield header
            for chunk in chunks:
                msg = pb.JoinReply(chunk=chunk)
                sent += msg.ByteSize()
                yield msg
            c.confirm_join(s, request.ByteSize(), sent, sum(lengths))
            ok = True
        finally:
            if not ok:
                c.abort_join(s)

    async def Exchange(self, request_iterator, context):
        c = self.c
        try:
            it = request_iterator.__aiter__()
            first = await it.__anext__()
        except StopAsyncIteration:
            await _abort(context, Rejected("INVALID_ARGUMENT", "empty Exchange: send a Submission header first"))
            return
        try:
            if first.WhichOneof("part") != "header":
                raise Rejected("INVALID_ARGUMENT", "the first Submission of an Exchange must carry the header")
            h = first.header
            s = c.session(h.client_id, h.session)
            kind = c.classify(s, h.round)
            message = first.ByteSize()
            if kind == "new":
                try:
                    parts = protocol.Reassembler(h.frame_lengths, c.expected_frames(h.round), c.frame_limit)
                    async for msg in it:
                        if msg.WhichOneof("part") != "chunk":
                            raise FrameError("a Submission after the first must carry a chunk, not another header")
                        message += msg.ByteSize()
                        parts.add(msg.chunk)
                    frames = parts.frames()
                except FrameError as exc:
                    raise Rejected("INVALID_ARGUMENT", f"client {h.client_id} round {h.round}: {exc}") from None
                kind = await c.accept(s, h.round, frames, h.train_loss,
                                      h.previous if h.HasField("previous") else None,
                                      parts.total, message)
                del frames, parts
            else:
                async for _ in it:  # a duplicate: read and drop, never apply
                    pass
            if kind in ("new", "pending"):
                plan = await c.result(h.round)
            else:
                plan = c.reply_for(kind, h.round)
        except Rejected as exc:
            log.warning("refused Exchange: %s", exc)
            await _abort(context, exc)
            return
        duplicate = kind != "new"
        header = plan.header(duplicate=duplicate)
        yield header
        for msg in plan.chunks:
            yield msg
        if not duplicate:
            c.record_down(plan, s.client_id, header.ByteSize() + plan.chunk_message_bytes)

    async def Leave(self, request: pb.LeaveRequest, context):
        try:
            s = self.c.session(request.client_id, request.session)
        except Rejected as exc:
            await _abort(context, exc)
            return pb.LeaveReply()
        self.c.leave(s, request.last if request.HasField("last") else None, request.reason)
        return pb.LeaveReply()

    async def Status(self, request: pb.StatusRequest, context):
        return self.c.status()


async def start(coordinator: Coordinator, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for `coordinator`; returns it and the bound port (port 0 = any free)."""
    server = grpc.aio.server(options=protocol.GRPC_OPTIONS)
    pb_grpc.add_ParameterServerServicer_to_server(ParameterServer(coordinator), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"could not listen on {host}:{port}")
    await server.start()
    return server, bound


async def serve(coordinator: Coordinator, host: str = "127.0.0.1", port: int = 0, on_ready=None,
                grace: float = 2.0) -> dict:
    """Serve until the run is finished or SIGTERM/SIGINT arrives; returns the report.

    `on_ready(port)` is called once the server listens (e.g. to start local workers). It may return
    an awaitable that watches them: if it raises, the run stops (partial report) and the error
    propagates; if it returns, serving simply continues until the run is finished.
    An interrupted run writes a partial report (summary.partial = true) and returns normally.
    """
    import signal

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
        coordinator.executor.shutdown(wait=True, cancel_futures=True)
    if watcher is not None and watcher.done() and watcher.exception() is not None and not interrupted.is_set():
        raise watcher.exception()
    if coordinator.failed is not None and not interrupted.is_set():
        raise coordinator.failed
    return coordinator.report.to_dict()

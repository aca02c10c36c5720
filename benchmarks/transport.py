"""`efmuon bench transport`: one client pushes 1 KB .. 512 MB as one Exchange vs raw TCP, same run.

The push goes the worker's chunk path (`stub.client_stub`: header + `chunking.iter_chunk_messages`
-> grpc) to a minimal grpc.aio servicer in a helper process (`service` mode sink) that receives
exactly as `service.ParameterServer.Exchange` does, directly (the worker's default) and through the
worker's `CountingRelay` (its own wire count, for --link and --client-wire), vs a raw TCP `sendall`
of the same bytes into a preallocated buffer on the same loopback, interleaved. Every speed figure
is a ratio to that baseline (these machines are noisy). The sink counts each request's wire bytes
as the server does (`wirecount.TcpInfo`: its socket's TCP_INFO) and answers with the figure.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

from ..common.errors import FrameError
from ..common.wire import chunking, protocol
from ..server.service import Undecodable, add_servicer, grpc_options
from ..server.wirecount import TcpInfo, parse_peer
from ..v1 import service_pb2 as pb
from ..v1 import service_pb2_grpc as pb_grpc
from ..worker import stub
from ..worker.relay import CountingRelay
from .harness import bench, by_level, goal, table
from .proc import kill_leftovers, read_json, spawn

BARE_SERVICE = "efmuon.bench.Bare"  # the sink's reference methods: raw bytes, no protobuf


# ------------------------------------------------------------------------- the sink (a helper process)
def _recv_exact(conn: socket.socket, view) -> bool:
    pos, n = 0, len(view)
    while pos < n:
        got = conn.recv_into(view[pos:], n - pos)
        if not got:
            return False
        pos += got
    return True


def _raw_conn(conn: socket.socket) -> None:
    """One raw TCP sender: length-prefixed payloads into a reused buffer, each acked by b"k"."""
    hdr = bytearray(8)
    buf = bytearray(0)  # reused: the baseline pays neither allocation nor page faults
    while _recv_exact(conn, memoryview(hdr)):
        (n,) = struct.unpack("<Q", hdr)
        if len(buf) < n:
            buf = bytearray(n)
        if not _recv_exact(conn, memoryview(buf)[:n]):
            break
        conn.sendall(b"k")
    conn.close()


def _raw_server(lsock: socket.socket) -> None:
    while True:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_raw_conn, args=(conn,), daemon=True).start()


class _Sink(pb_grpc.ParameterServerServicer):
    """Exchange as the server receives it; the reply's frame_lengths[0] is the request's wire bytes as
    the sink's socket counted them (TCP_INFO, the server's way: since the previous request on the
    connection ended), -1 where the kernel does not say."""

    def __init__(self) -> None:
        self.port = 0
        self.info = TcpInfo()
        try:
            self.info.open()
        except OSError:
            self.info = None
        self.conns: dict[str, list] = {}  # peer -> [family, sockid, bytes received when the last request ended]

    def received(self, peer: str) -> int:
        """Bytes the connection `peer` received since its previous request ended (-1: unknown)."""
        if self.info is None:
            return -1
        conn = self.conns.get(peer)
        if conn is None:
            addr = parse_peer(peer)
            found = self.info.find(self.port, addr) if addr is not None else None
            if found is None:
                return -1
            conn = self.conns[peer] = [*found, 0]
        now = self.info.read(conn[0], conn[1])
        if now is None:
            return -1
        up, conn[2] = now[0] - conn[2], now[0]
        return up

    async def Exchange(self, request_iterator, context):  # noqa: N802 - the servicer's method name
        it = request_iterator.__aiter__()
        first = await it.__anext__()
        h = first.header
        message = first.ByteSize()
        parts = chunking.Reassembler(h.frame_lengths)
        async for msg in it:  # as service.ParameterServer.Exchange receives a new submission
            if isinstance(msg, Undecodable):
                raise FrameError(str(msg.rejected()))
            if msg.WhichOneof("part") != "chunk":
                raise FrameError("a Submission after the first must carry a chunk")
            chunk = msg.chunk
            if len(chunk) > protocol.CHUNK_BYTES:
                raise FrameError("a chunk over 1 MiB")
            message += chunking.received_chunk_size(msg, len(chunk))
            parts.add(chunk)
        frames = parts.frames()
        del frames, parts
        yield pb.Downlink(header=pb.DownlinkHeader(round=h.round + 1, frame_lengths=[self.received(context.peer())]))


async def _bare_unary(request: bytes, context) -> bytes:
    return b"k"


async def _bare_stream(request_iterator, context):
    async for _ in request_iterator:
        pass
    yield b"k"


async def _sink_serve() -> None:
    server = grpc.aio.server(options=grpc_options())
    sink = _Sink()
    add_servicer(sink, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(BARE_SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_bare_unary),
        "Stream": grpc.stream_stream_rpc_method_handler(_bare_stream)}),))
    port = sink.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    threading.Thread(target=_raw_server, args=(lsock,), daemon=True).start()
    print(json.dumps({"grpc": port, "raw": lsock.getsockname()[1], "pid": os.getpid()}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await server.stop(0)


def sink_main(spec: dict) -> None:
    """Transport receiver: a grpc.aio servicer receiving an Exchange like the real one (registered by
    `service.add_servicer`, so with the server's own deserializers and options), two bare gRPC
    methods as a reference (Unary: the payload as one raw message; Stream: raw 1 MiB messages, one
    reply; both answer b"k"), and a raw TCP receiver (length-prefixed, recv_into a preallocated
    buffer, 1-byte ack). It runs until its stdin is closed."""
    asyncio.run(_sink_serve())


# ------------------------------------------------------------------------------------ the sender
def _submission_messages(round_: int, frames: list) -> tuple[list, int]:
    """The worker's request stream for one Exchange (header, then the chunk messages of
    chunking.iter_chunk_messages, sent by `stub.client_stub`) and its message bytes (sum of
    ByteSize) -- built lazily by the generator the caller iterates."""

    h = pb.SubmissionHeader(client_id=0, session="bench", round=round_, frame_lengths=[len(f) for f in frames],
                            train_loss=float("nan"))
    sizes: list[int] = []

    def gen():
        return stub.submission_messages(h, frames, sizes)  # the worker's own request stream
    return gen, sizes


class _Pusher:
    """The sending side, all in this process: the worker's stub through its CountingRelay and direct,
    the sink's bare gRPC methods, a raw TCP socket. Each push returns its seconds, call to reply."""

    def __init__(self, ports: dict):
        self.relay = CountingRelay("127.0.0.1", ports["grpc"])
        lhost, lport = self.relay.start()
        self.relay_ch = grpc.insecure_channel(f"{lhost}:{lport}", options=protocol.CHANNEL_OPTIONS)
        self.direct_ch = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}", options=protocol.CHANNEL_OPTIONS)
        self.stubs = {"relay": stub.client_stub(self.relay_ch), "direct": stub.client_stub(self.direct_ch)}
        # the bare calls on a connection of their own: the sink counts each Exchange's connection
        self.bare_ch = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}", options=protocol.CHANNEL_OPTIONS)
        self.unary = self.bare_ch.unary_unary(f"/{BARE_SERVICE}/Unary")
        self.stream = self.bare_ch.stream_stream(f"/{BARE_SERVICE}/Stream")
        self.raw = socket.create_connection(("127.0.0.1", ports["raw"]))
        self.raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def grpc(self, kind: str, frames: list) -> tuple[float, int, int, int, int | None]:
        """One Exchange: (seconds, message bytes, the relay's wire bytes up and down, the sink's count up)."""
        gen, msg_sizes = _submission_messages(1, frames)
        c0 = self.relay.counters()
        t0 = time.perf_counter()
        for reply in self.stubs[kind].Exchange(gen()):
            pass
        dt = time.perf_counter() - t0
        c1 = self.relay.counters()
        counted = reply.header.frame_lengths[0] if reply.header.frame_lengths else -1
        return dt, sum(msg_sizes), c1["up"] - c0["up"], c1["down"] - c0["down"], counted if counted >= 0 else None

    def bare_unary(self, payload: bytes) -> float:
        t0 = time.perf_counter()
        self.unary(payload)
        return time.perf_counter() - t0

    def bare_stream(self, payload: bytes) -> float:
        view, step = memoryview(payload), protocol.CHUNK_BYTES
        t0 = time.perf_counter()
        for _ in self.stream(bytes(view[i:i + step]) for i in range(0, len(view), step)):
            pass
        return time.perf_counter() - t0

    def raw_push(self, payload: bytes) -> float:
        t0 = time.perf_counter()
        self.raw.sendall(struct.pack("<Q", len(payload)))
        self.raw.sendall(payload)
        if self.raw.recv(1) != b"k":
            raise RuntimeError("raw sink closed")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.raw.close()
        self.relay_ch.close()
        self.direct_ch.close()
        self.bare_ch.close()
        self.relay.stop()


UNARY_MAX = protocol.MAX_MESSAGE_BYTES - 1024  # one raw message must fit the message limit


def _warm_up(p: _Pusher, n: int, rounds: int, rng) -> None:
    """HTTP/2 connection setup, window growth, the raw receiver's buffer."""
    warm = [rng.bytes(n)]
    for _ in range(rounds):
        p.grpc("relay", warm), p.grpc("direct", warm), p.raw_push(warm[0]), p.bare_stream(warm[0])
        if len(warm[0]) <= UNARY_MAX:
            p.bare_unary(warm[0])


def _measure_size(p: _Pusher, n: int, reps: int, rng) -> dict:
    frames = [rng.bytes(n)]
    t_raw, t_rel, t_dir, t_una, t_str, wires = [], [], [], [], [], []
    for _ in range(reps):  # interleaved: drift hits all of them alike
        t_raw.append(p.raw_push(frames[0]))
        dt, message, up, down, relay_counted = p.grpc("relay", frames)
        t_rel.append(dt)
        dt, _, _, _, counted = p.grpc("direct", frames)
        t_dir.append(dt)
        wires.append((up, down, relay_counted, counted))
        t_str.append(p.bare_stream(frames[0]))
        if n <= UNARY_MAX:
            t_una.append(p.bare_unary(frames[0]))
    up, down, relay_counted, counted = wires[-1]
    mr, mg, md = statistics.median(t_raw), statistics.median(t_rel), statistics.median(t_dir)
    ms = statistics.median(t_str)
    mu = statistics.median(t_una) if t_una else None
    row = {"size": _size_name(n), "payload": n, "message": message, "wire_up": up, "wire_down": down,
           "server_up": counted, "server_up_relayed": relay_counted,
           "message/payload": message / n, "wire/payload": up / n,
           "server/payload": counted / n if counted is not None else None,
           "raw_MBps": n / mr / 1e6, "grpc_relay_MBps": n / mg / 1e6, "grpc_direct_MBps": n / md / 1e6,
           "x_raw_relay": mr / mg, "x_raw_direct": mr / md,
           "x_raw_bare_unary": mr / mu if mu else None, "x_raw_bare_stream": mr / ms, "reps": reps}
    unary = f"{row['x_raw_bare_unary']:.2f}x" if mu else "-"
    server = f"{row['server/payload']:.4f}" if counted is not None else "-"
    print(f"  {row['size']:>8s}: wire/payload {row['wire/payload']:.4f} (server {server})  raw {row['raw_MBps']:8.1f} MB/s  "
          f"grpc+relay {row['grpc_relay_MBps']:8.1f} ({row['x_raw_relay']:.2f}x)  "
          f"grpc direct {row['grpc_direct_MBps']:8.1f} ({row['x_raw_direct']:.2f}x)  "
          f"bare unary {unary}  bare stream {row['x_raw_bare_stream']:.2f}x", flush=True)
    return row


def _transport_measure(sizes: list[int], reps_for, warmups: int = 2) -> list[dict]:
    sink = spawn("sink", {}, stdin=subprocess.PIPE)
    try:
        p = _Pusher(read_json(sink))
        rng = np.random.default_rng(0)
        _warm_up(p, max(sizes), warmups, rng)
        rows = [_measure_size(p, n, reps_for(n), rng) for n in sizes]
        p.close()
    finally:
        try:
            sink.stdin.close()
            sink.wait(10)
        except Exception:  # noqa: BLE001
            kill_leftovers([sink])
    return rows


def _size_name(n: int) -> str:
    for unit, f in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= f:
            return f"{n / f:g} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------------ the bench
def _tcpip_overhead(mtu: int, ethernet: bool) -> float:
    """IP/TCP (+ Ethernet framing) header bytes per TCP payload byte for full segments:
    IPv4 20 + TCP 20 + timestamps option 12 per segment of MSS = MTU - 52 (+ Ethernet header 14)."""
    mss = mtu - 52
    return (52 + (14 if ethernet else 0)) / mss


@bench("transport")
def bench_transport(level: str) -> dict:
    """One client pushing 1 KB .. 512 MB through the real chunk path vs raw TCP sendall, same run."""
    top = by_level(level, full=512 << 20, quick=8 << 20, smoke=1 << 20)
    sizes = [1 << 10, 64 << 10, 1 << 20, 8 << 20, 64 << 20, 512 << 20]
    sizes = [s for s in sizes if s <= top]

    def reps_for(n):
        if level == "smoke":
            return 1
        if level == "quick":
            return 3 if n <= (1 << 20) else 2
        return 30 if n <= (1 << 20) else 7 if n <= (8 << 20) else 5 if n <= (64 << 20) else 3

    rows = _transport_measure(sizes, reps_for, warmups=1 if level == "smoke" else 2)
    try:
        lo_mtu = int(open("/sys/class/net/lo/mtu").read())
    except OSError:
        lo_mtu = 65536
    eth = _tcpip_overhead(1500, True)
    lo = _tcpip_overhead(lo_mtu, False)
    for r in rows:
        wire = r["server/payload"] if r["server/payload"] is not None else r["wire/payload"]
        r["+ip/tcp_eth1500"] = wire * (1 + eth)
        r["+ip/tcp_lo"] = wire * (1 + lo)
    cols = ["size", "payload", "message", "server_up", "wire_up", "message/payload", "server/payload",
            "wire/payload", "+ip/tcp_eth1500", "+ip/tcp_lo", "raw_MBps", "grpc_direct_MBps", "x_raw_direct",
            "grpc_relay_MBps", "x_raw_relay", "x_raw_bare_unary", "x_raw_bare_stream", "reps"]
    notes = _transport_notes(eth, lo, lo_mtu)
    goals = _transport_goals([r for r in rows if r["payload"] >= (1 << 20)])
    return {"result": rows, "goals": goals, "table": notes + "\n\n" + table(rows, cols) + TRANSPORT_NOTES}


def _transport_goals(big: list[dict]) -> list[dict]:
    """The goals over the rows of 1 MB and more."""
    counted = [r for r in big if r["server_up"] is not None and r["server_up_relayed"] is not None]
    worst_wire = max((r["server/payload"] if r in counted else r["wire/payload"]) for r in big)
    worst_diff = max((abs(r["server_up_relayed"] - r["wire_up"]) / r["payload"] for r in counted), default=None)
    worst_direct, worst_relay = min(r["x_raw_direct"] for r in big), min(r["x_raw_relay"] for r in big)
    return [
        goal("wire/payload from 1 MB up, the server's own count of a direct push (worst size, TCP payload bytes)",
             round(worst_wire, 4), "<= 1.01", worst_wire <= 1.01),
        goal("the server's count vs the worker relay's count of the same relayed push, from 1 MB up "
             "(worst |difference| / payload)", None if worst_diff is None else round(worst_diff, 6), "<= 0.001",
             worst_diff is not None and worst_diff <= 0.001),
        goal("goodput vs raw TCP sendall from 1 MB up, direct gRPC channel (the worker's default: the server "
             "counts; worst size)", round(worst_direct, 3), ">= 0.7x", worst_direct >= 0.7),
        goal("goodput vs raw TCP sendall from 1 MB up, through the worker's CountingRelay (--link, --client-wire; "
             "worst size)", round(worst_relay, 3), ">= 0.7x", worst_relay >= 0.7),
    ]


def _transport_notes(eth: float, lo: float, lo_mtu: int) -> str:
    return (f"One Exchange per push, sent as the worker sends it (`stub.client_stub`): header + "
            f"`chunking.iter_chunk_messages` (1 MiB chunk messages serialized by one join) -> grpc -> a grpc.aio "
            f"servicer registered by `service.add_servicer` and receiving exactly as `ParameterServer.Exchange` "
            f"(chunk messages as `chunking.ReceivedChunk` views, `chunking.received_chunk_size`, `Reassembler.add`, "
            f"`frames()`), reply = one Downlink header. Timed from the call to the reply (median of `reps`, "
            f"interleaved with the baseline). Baseline: raw TCP `sendall` of the same bytes to a receiver that "
            f"`recv_into`s a buffer allocated once and reused (no allocation, no page faults: the socket's own "
            f"speed) and acks 1 byte; the receivers run in one subprocess, the senders (and the relay) in this "
            f"one, all on 127.0.0.1. x_raw_* = raw time / gRPC time. server_up = the request's bytes as the "
            f"receiving socket counted them (TCP_INFO bytes_received read through sock_diag, `wirecount.TcpInfo`, "
            f"from the end of the previous request on the connection: the server's own `wire` figure) for the "
            f"direct push; wire_up = bytes the worker's relay read from the client for the relayed push (its "
            f"`wire_client` cross-check; wire_down = the reply + WINDOW_UPDATE/PING frames). Both are HTTP/2 + "
            f"gRPC framing + protobuf tags. IP/TCP headers are not on the wire count: estimated per full segment "
            f"as IPv4 20 + TCP 20 + timestamps 12 (+ Ethernet 14) bytes per MSS = MTU - 52, i.e. {eth:.2%} at "
            f"MTU 1500 on Ethernet and {lo:.3%} on this loopback (MTU {lo_mtu}); the +ip/tcp columns are "
            f"server/payload including them (ACKs in the other direction not counted). Reference (what gRPC "
            f"itself allows here, direct channel, same sink process, interleaved): x_raw_bare_unary = one unary "
            f"call carrying the payload as one raw message (no protobuf; '-' above the 64 MiB message limit), "
            f"x_raw_bare_stream = a stream-stream call of raw 1 MiB messages answered by one message (Exchange's "
            f"shape without protobuf or reassembly).")


# Measured on this machine (2 cores, shared): py-spy (200-250 Hz), per-process CPU from /proc/PID/stat
# (user/sys, all threads), page faults from minflt, and same-run A/B scripts (old vs new code interleaved).
TRANSPORT_NOTES = """

Profile and bounds (2 cores shared with other jobs, load 4-6 during these measurements):
- Receiver: Exchange's chunk messages are now parsed by `chunking.chunk_deserializer`: a message that is exactly
  one `chunk` field becomes a `ReceivedChunk`, a memoryview into the bytes gRPC handed over (before: upb parsed
  the MiB into its arena and `msg.chunk` copied it out again, 2 copies + ~2 MiB of heap per chunk that glibc
  trimmed and re-faulted). Old and new receivers in the same run, 64 MB pushes: receiver CPU 1.80 -> 0.82
  ms/MiB; goodput (interleaved, two runs) 0.30 -> 0.36x raw direct, 0.20-0.21 -> 0.22-0.30x through the relay
  (the sender bounds it); 1 MB pushes: receiver page faults 809 -> 503 per call. Any other encoding (and
  every undecodable one) takes the protobuf path, so frames, byte counts and errors are unchanged.
- Sender (the bottleneck now, direct): 0.94 ms/MiB of CPU at 64 MB (user 0.35, sys 0.59: loopback send incl.
  the peer's TCP receive work) when each chunk went through `iter_chunks`' bytes copy + `pb.Submission(chunk=)`
  (upb copies) + `SerializeToString` (2 more copies). The worker's stub (`stub.client_stub`, used here too)
  now sends chunk messages serialized by one join (`chunking.iter_chunk_messages`: tag + varint + memoryviews
  of the frames, byte-identical to protobuf's). Old vs new request path in one process, interleaved, 12
  pushes each: sender CPU 0.74 -> 0.62 ms/MiB at 8 MB and 0.49 -> 0.41 at 64 MB direct (1.01 -> 0.87 through
  the relay); push time new/old 0.74 (1 MB), 0.89 (8 MB), 0.98 (64 MB) direct, 0.97 / 0.93 / 0.86 relay.
  The worker also reads Join and Exchange reply chunks as `ReceivedChunk` views (downlink of 1/8/64 MiB into a
  `Reassembler`, old vs new interleaved: receiver CPU 2.78 -> 2.17, 0.88 -> 0.71, 1.31 -> 1.06 ms/MiB; pull
  time 0.81 / 0.87 / 0.78x).
- Per call (<= 1 MB): the sync client's streaming machinery (py-spy of the sender at 1 MB pushes: channel spin
  thread 32%, request-consumer thread started per call and run ~13%, call creation 7%) plus heap trimming:
  each call's transient MiB buffers are given back to the OS (brk shrink) and faulted in again by the next
  call (~250-450 faults per 1 MB call in the sender, ~500 in the receiver). The bare stream column is gRPC
  without any of this project's code: Exchange is within noise of it at 1-8 MB and ~0.7x of it above.
- Relay: the CountingRelay's hop costs the sender process ~0.4 ms/MiB more CPU (64 MB: 1.33 vs 0.94 ms/MiB),
  nearly all kernel TCP work of the extra loopback connection: plain sockets through the relay reach 0.46x of
  the same push direct (1230 vs 2699 MB/s), which bounds x_raw_relay whatever the gRPC path does. An os.splice
  relay (socket -> pipe -> socket in per-direction threads, GIL released) was measured and not kept: same CPU
  (0.53 vs 0.50 ms/MiB incl. the sender) and push time (splice/loop 0.89-1.02 at 1-64 MB through gRPC).
  The server now counts without a hop: its own socket's TCP_INFO (bytes_received, bytes_acked) read through
  sock_diag netlink (server/wirecount.py: once per connection a port-filtered dump finding the socket, ~0.5 ms,
  then an exact lookup by addresses and cookie, ~13 us incl. Python, twice per Exchange and once per Join and
  Leave). So the worker connects directly by default (x_raw_direct) and the relay is on the path only for
  in-process link shaping (--link) and the worker's own count (--client-wire, a cross-check of the server's).
- Options tried, both ends, none faster than the defaults (kept): grpc.http2.bdp_probe=0, lookahead_bytes
  16 MiB (with BDP probing on, grpc core resizes the window itself), max_frame_size 16 MiB, write_buffer_size
  16 MiB (only used with write-buffer hints). Chunk messages of 256 KiB / 4 MiB / 16 MiB: none faster than
  1 MiB (4 MiB: 0.21x vs 0.53x at 8 MB in one run), so CHUNK_BYTES stays 1 MiB."""

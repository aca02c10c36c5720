"""Service benchmarks: `efmuon bench transport|scaling|memory|bytes-wire` (registered in common.bench).

Every speed figure is a ratio to a baseline measured in the same run (these machines are noisy).
The server side of `transport`, `scaling` and `memory` runs in a subprocess started from this
module (`python -m efmuon.benchmarks.service sink|serve|worker|idle JSON`), so it has its own
interpreter and its own CPU and memory figures, as in a real deployment.

transport   one client pushes 1 KB .. 512 MB as one Exchange (the worker's chunk path:
            `chunking.iter_chunks` -> Submission chunks -> grpc -> `chunking.Reassembler`) to a
            minimal grpc.aio servicer that receives exactly as `service.ParameterServer.Exchange`
            does, through the worker's `CountingRelay` (wire bytes), vs a raw TCP `sendall` of the
            same bytes into a preallocated buffer on the same loopback, same run, interleaved.
scaling     the real Coordinator + servicer for a synthetic model (spectral 256x1024 matrices),
            driven by n light synthetic clients (threads in this process: Join, then each round one
            Exchange of precomputed uplink frames, no gradient computation). Server phases are timed
            by wrapping ServerState / Plan / Reassembler methods inside the server process only.
memory      peak RSS (VmHWM) of a real server process and real `Worker` processes vs model size,
            minus the VmHWM of an idle process that imported the same modules.
bytes-wire  `efmuon.server.app.run_local` (real server + worker processes): payload vs wire bytes.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

from ..common import algorithm
from ..common.algorithm import WorkerState, frame_seed, layer_compressors
from ..common.config import DEFAULT_DOWNLINK, DEFAULT_UPLINK, RunConfig
from ..common.errors import FrameError
from ..common.lmo import assign_norms, available_cores, lmo_threads, ns_step_flops
from ..common.runtime import configure_torch
from ..common.tasks import make_task
from ..common.wire import chunking, protocol
from ..server import service  # noqa: F401
from ..server.local import run_local
from ..server.coordinator import Coordinator, Plan, ServerModel
from ..server.service import Undecodable, add_servicer, grpc_options, serve
from ..v1 import service_pb2 as pb
from ..v1 import service_pb2_grpc as pb_grpc
from ..worker import (
    client,  # noqa: F401
    stub,
)
from ..worker.client import Worker
from ..worker.relay import CountingRelay
from .harness import bench, goal, table

# ------------------------------------------------------------------------------------ helpers


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM / VmRSS in bytes from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def _cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(mode: str, spec: dict) -> subprocess.Popen:
    """A helper subprocess of this module; it prints one JSON line when ready (and one when done)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "efmuon.benchmarks.service", mode, json.dumps(spec)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)


def _read_json(proc: subprocess.Popen, timeout: float = 600.0) -> dict:
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout)
        raise RuntimeError(f"bench helper exited with code {proc.returncode} before reporting")
    return json.loads(line)


def _linfit(xs, ys) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns (a, b, r^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def _size_name(n: int) -> str:
    for unit, f in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= f:
            return f"{n / f:g} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------- synthetic model
LAYER_SHAPE = (256, 1024)  # 262,144 parameters per layer, spectral norm (Newton-Schulz on 256x1024)


def synthetic_layers(params: int) -> list[tuple[str, tuple[int, ...]]]:
    """~`params` parameters as spectral 256x1024 matrices (the remainder as one smaller matrix)."""
    per = LAYER_SHAPE[0] * LAYER_SHAPE[1]
    full, rest = divmod(int(params), per)
    shapes = [LAYER_SHAPE] * full
    if rest >= 1024:
        shapes.append((rest // 1024, 1024))
    return [(f"layers.{i}", s) for i, s in enumerate(shapes)]


def synthetic_config(workers: int, rounds: int, uplink: str, downlink: str, init: str):

    return RunConfig(task="lsq", workers=workers, rounds=rounds, uplink=uplink, downlink=downlink, init=init,
                     lr=0.01, beta=0.1, schedule="constant", warmup=0, preset="muon", eval_every=10 ** 9,
                     threads=1)


class SyntheticModule:
    """nn.Module factory whose parameters are named like `synthetic_layers` (layers.0, layers.1, ...)."""

    @staticmethod
    def build(layers, seed: int = 0):
        import torch

        class Synth(torch.nn.Module):
            def __init__(self):
                super().__init__()
                g = torch.Generator().manual_seed(seed)
                self.layers = torch.nn.ParameterList(
                    [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _, s in layers])

        return Synth()

    @staticmethod
    def loss(model, batch):
        # 0.5 sum p^2: the gradient is p itself (autograd keeps no extra copy of the model)
        return sum(0.5 * (p * p).sum() for p in model.parameters())


# ----------------------------------------------------------------------------------- transport
BARE_SERVICE = "efmuon.bench.Bare"  # the sink's reference methods: raw bytes, no protobuf


def _sink_main(spec: dict) -> None:
    """Transport receiver: a grpc.aio servicer receiving an Exchange like the real one (registered by
    `service.add_servicer`, so with the server's own deserializers and options), two bare gRPC
    methods as a reference (Unary: the payload as one raw message; Stream: raw 1 MiB messages, one
    reply; both answer b"k"), and a raw TCP receiver (length-prefixed, recv_into a preallocated
    buffer, 1-byte ack)."""
    import asyncio

    import grpc

    def raw_server(lsock: socket.socket) -> None:
        while True:
            conn, _ = lsock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=raw_conn, args=(conn,), daemon=True).start()

    def recv_exact(conn, view) -> bool:
        pos, n = 0, len(view)
        while pos < n:
            got = conn.recv_into(view[pos:], n - pos)
            if not got:
                return False
            pos += got
        return True

    def raw_conn(conn: socket.socket) -> None:
        hdr = bytearray(8)
        buf = bytearray(0)  # reused: the baseline pays neither allocation nor page faults
        while recv_exact(conn, memoryview(hdr)):
            (n,) = struct.unpack("<Q", hdr)
            if len(buf) < n:
                buf = bytearray(n)
            if not recv_exact(conn, memoryview(buf)[:n]):
                break
            conn.sendall(b"k")
        conn.close()

    class Sink(pb_grpc.ParameterServerServicer):
        async def Exchange(self, request_iterator, context):
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
            yield pb.Downlink(header=pb.DownlinkHeader(round=h.round + 1))

    async def bare_unary(request: bytes, context) -> bytes:
        return b"k"

    async def bare_stream(request_iterator, context):
        async for _ in request_iterator:
            pass
        yield b"k"

    async def main() -> None:
        server = grpc.aio.server(options=grpc_options())
        add_servicer(Sink(), server)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(BARE_SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(bare_unary),
            "Stream": grpc.stream_stream_rpc_method_handler(bare_stream)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        threading.Thread(target=raw_server, args=(lsock,), daemon=True).start()
        print(json.dumps({"grpc": port, "raw": lsock.getsockname()[1], "pid": os.getpid()}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        await server.stop(0)

    asyncio.run(main())


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


def _transport_measure(sizes: list[int], reps_for) -> list[dict]:
    import grpc
    import numpy as np

    sink = subprocess.Popen([sys.executable, "-m", "efmuon.benchmarks.service", "sink", "{}"], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows = []
    try:
        ports = json.loads(sink.stdout.readline())
        relay = CountingRelay("127.0.0.1", ports["grpc"])
        lhost, lport = relay.start()
        relay_ch = grpc.insecure_channel(f"{lhost}:{lport}", options=protocol.CHANNEL_OPTIONS)
        direct_ch = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}", options=protocol.CHANNEL_OPTIONS)
        stubs = {"relay": stub.client_stub(relay_ch), "direct": stub.client_stub(direct_ch)}  # the worker's
        bare_unary = direct_ch.unary_unary(f"/{BARE_SERVICE}/Unary")
        bare_stream = direct_ch.stream_stream(f"/{BARE_SERVICE}/Stream")
        raw = socket.create_connection(("127.0.0.1", ports["raw"]))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rng = np.random.default_rng(0)

        def via_grpc(kind, frames):
            gen, msg_sizes = _submission_messages(1, frames)
            c0 = relay.counters()
            t0 = time.perf_counter()
            for _ in stubs[kind].Exchange(gen()):
                pass
            dt = time.perf_counter() - t0
            c1 = relay.counters()
            return dt, sum(msg_sizes), c1["up"] - c0["up"], c1["down"] - c0["down"]

        def via_bare_unary(payload):
            t0 = time.perf_counter()
            bare_unary(payload)
            return time.perf_counter() - t0

        def via_bare_stream(payload):
            view, step = memoryview(payload), protocol.CHUNK_BYTES
            t0 = time.perf_counter()
            for _ in bare_stream(bytes(view[i:i + step]) for i in range(0, len(view), step)):
                pass
            return time.perf_counter() - t0

        def via_raw(payload):
            t0 = time.perf_counter()
            raw.sendall(struct.pack("<Q", len(payload)))
            raw.sendall(payload)
            if raw.recv(1) != b"k":
                raise RuntimeError("raw sink closed")
            return time.perf_counter() - t0

        # warm up: HTTP/2 connection setup, window growth, the raw receiver's buffer
        warm = [rng.bytes(max(sizes))]
        unary_max = protocol.MAX_MESSAGE_BYTES - 1024  # one raw message must fit the message limit
        for _ in range(2):
            via_grpc("relay", warm), via_grpc("direct", warm), via_raw(warm[0]), via_bare_stream(warm[0])
            if len(warm[0]) <= unary_max:
                via_bare_unary(warm[0])
        for n in sizes:
            frames = [rng.bytes(n)]
            reps = reps_for(n)
            t_raw, t_rel, t_dir, t_una, t_str, wires = [], [], [], [], [], []
            for _ in range(reps):  # interleaved: drift hits all of them alike
                t_raw.append(via_raw(frames[0]))
                dt, message, up, down = via_grpc("relay", frames)
                t_rel.append(dt)
                wires.append((up, down))
                t_dir.append(via_grpc("direct", frames)[0])
                t_str.append(via_bare_stream(frames[0]))
                if n <= unary_max:
                    t_una.append(via_bare_unary(frames[0]))
            up, down = wires[-1]
            mr, mg, md = statistics.median(t_raw), statistics.median(t_rel), statistics.median(t_dir)
            ms = statistics.median(t_str)
            mu = statistics.median(t_una) if t_una else None
            row = {"size": _size_name(n), "payload": n, "message": message, "wire_up": up, "wire_down": down,
                   "message/payload": message / n, "wire/payload": up / n,
                   "raw_MBps": n / mr / 1e6, "grpc_relay_MBps": n / mg / 1e6, "grpc_direct_MBps": n / md / 1e6,
                   "x_raw_relay": mr / mg, "x_raw_direct": mr / md,
                   "x_raw_bare_unary": mr / mu if mu else None, "x_raw_bare_stream": mr / ms, "reps": reps}
            rows.append(row)
            unary = f"{row['x_raw_bare_unary']:.2f}x" if mu else "-"
            print(f"  {row['size']:>8s}: wire/payload {row['wire/payload']:.4f}  raw {row['raw_MBps']:8.1f} MB/s  "
                  f"grpc+relay {row['grpc_relay_MBps']:8.1f} ({row['x_raw_relay']:.2f}x)  "
                  f"grpc direct {row['grpc_direct_MBps']:8.1f} ({row['x_raw_direct']:.2f}x)  "
                  f"bare unary {unary}  bare stream {row['x_raw_bare_stream']:.2f}x", flush=True)
            del frames
        raw.close()
        relay_ch.close()
        direct_ch.close()
        relay.stop()
    finally:
        try:
            sink.stdin.close()
            sink.wait(10)
        except Exception:  # noqa: BLE001
            sink.kill()
    return rows


def _tcpip_overhead(mtu: int, ethernet: bool) -> float:
    """IP/TCP (+ Ethernet framing) header bytes per TCP payload byte for full segments:
    IPv4 20 + TCP 20 + timestamps option 12 per segment of MSS = MTU - 52 (+ Ethernet header 14)."""
    mss = mtu - 52
    return (52 + (14 if ethernet else 0)) / mss


@bench("transport")
def bench_transport(quick: bool) -> dict:
    """One client pushing 1 KB .. 512 MB through the real chunk path vs raw TCP sendall, same run."""
    top = (8 << 20) if quick else (512 << 20)
    sizes = [1 << 10, 64 << 10, 1 << 20, 8 << 20, 64 << 20, 512 << 20]
    sizes = [s for s in sizes if s <= top]

    def reps_for(n):
        if quick:
            return 3 if n <= (1 << 20) else 2
        return 30 if n <= (1 << 20) else 7 if n <= (8 << 20) else 5 if n <= (64 << 20) else 3

    rows = _transport_measure(sizes, reps_for)
    try:
        lo_mtu = int(open("/sys/class/net/lo/mtu").read())
    except OSError:
        lo_mtu = 65536
    eth = _tcpip_overhead(1500, True)
    lo = _tcpip_overhead(lo_mtu, False)
    for r in rows:
        r["+ip/tcp_eth1500"] = r["wire/payload"] * (1 + eth)
        r["+ip/tcp_lo"] = r["wire/payload"] * (1 + lo)
    big = [r for r in rows if r["payload"] >= (1 << 20)]
    worst_wire = max(r["wire/payload"] for r in big)
    worst_x = min(r["x_raw_relay"] for r in big)
    goals = [
        goal("wire/payload from 1 MB up (worst size, TCP payload bytes)", round(worst_wire, 4), "<= 1.01",
             worst_wire <= 1.01),
        goal("goodput vs raw TCP sendall from 1 MB up, through the worker's CountingRelay (worst size)",
             round(worst_x, 3), ">= 0.7x", worst_x >= 0.7),
        goal("goodput vs raw TCP sendall from 1 MB up, direct gRPC channel (measure_wire=False; worst size)",
             round(min(r["x_raw_direct"] for r in big), 3), ">= 0.7x",
             min(r["x_raw_direct"] for r in big) >= 0.7),
    ]
    cols = ["size", "payload", "message", "wire_up", "message/payload", "wire/payload", "+ip/tcp_eth1500",
            "+ip/tcp_lo", "raw_MBps", "grpc_relay_MBps", "x_raw_relay", "grpc_direct_MBps", "x_raw_direct",
            "x_raw_bare_unary", "x_raw_bare_stream", "reps"]
    notes = (f"One Exchange per push, sent as the worker sends it (`stub.client_stub`): header + "
             f"`chunking.iter_chunk_messages` (1 MiB chunk messages serialized by one join) -> grpc -> "
             f"a grpc.aio servicer "
             f"registered by `service.add_servicer` and receiving exactly as `ParameterServer.Exchange` (chunk "
             f"messages as `chunking.ReceivedChunk` views, `chunking.received_chunk_size`, `Reassembler.add`, "
             f"`frames()`), reply = "
             f"one Downlink header. Timed from the call to the reply (median of `reps`, interleaved with the "
             f"baseline). Baseline: raw TCP `sendall` of the same bytes to a receiver that `recv_into`s a "
             f"buffer allocated once and reused (no allocation, no page faults: the socket's own speed) and acks "
             f"1 byte; the receivers run in one subprocess, the senders (and the relay) in this one, all on "
             f"127.0.0.1. x_raw_* = raw time / gRPC time. wire_up = bytes the relay "
             f"read from the client's TCP connection (HTTP/2 + gRPC framing + protobuf tags; wire_down = the "
             f"reply + WINDOW_UPDATE/PING frames). IP/TCP headers are not on the wire count: estimated per full "
             f"segment as IPv4 20 + TCP 20 + timestamps 12 (+ Ethernet 14) bytes per MSS = MTU - 52, i.e. "
             f"{eth:.2%} at MTU 1500 on Ethernet and {lo:.3%} on this loopback (MTU {lo_mtu}); the +ip/tcp "
             f"columns are wire/payload including them (ACKs in the other direction not counted). "
             f"Reference (what gRPC itself allows here, direct channel, same sink process, interleaved): "
             f"x_raw_bare_unary = one unary call carrying the payload as one raw message (no protobuf; '-' above "
             f"the 64 MiB message limit), x_raw_bare_stream = a stream-stream call of raw 1 MiB messages answered "
             f"by one message (Exchange's shape without protobuf or reassembly).")
    return {"result": rows, "goals": goals, "table": notes + "\n\n" + table(rows, cols) + TRANSPORT_NOTES}


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
  Counting without a hop (the kernel's TCP_INFO bytes_acked/bytes_received of gRPC's own socket) would remove
  this cost for unshaped links; gRPC Python does not expose that socket.
- Options tried, both ends, none faster than the defaults (kept): grpc.http2.bdp_probe=0, lookahead_bytes
  16 MiB (with BDP probing on, grpc core resizes the window itself), max_frame_size 16 MiB, write_buffer_size
  16 MiB (only used with write-buffer hints). Chunk messages of 256 KiB / 4 MiB / 16 MiB: none faster than
  1 MiB (4 MiB: 0.21x vs 0.53x at 8 MB in one run), so CHUNK_BYTES stays 1 MiB."""


# ------------------------------------------------------------------------------------- serve
def _serve_main(spec: dict) -> None:
    """A real Coordinator + servicer for a synthetic model; instrumented when spec['instrument']."""
    import asyncio

    configure_torch(spec.get("threads", 1))
    layers = synthetic_layers(spec["params"])
    names = [n for n, _ in layers]
    model = SyntheticModule.build(layers)
    params = [p.detach() for p in model.parameters()]
    del model
    specs = assign_norms(layers)
    cfg = synthetic_config(spec["workers"], spec["rounds"], spec["uplink"], spec["downlink"], spec["init"])
    timings: dict = {"decode": [], "aggregate": [], "lmo": [], "step": [], "plan": [], "recv": [], "process": [],
                     "record_down": [], "cpu": []}
    counts = {"decode_uplinks": 0, "decode_frames": 0, "step": 0, "plan_build": 0}

    if spec.get("instrument"):
        cur = {"round": 0}

        def timed(key, fn, count=None):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    timings[key].append((cur["round"], t0, time.perf_counter()))
                    if count:
                        counts[count] += 1
                    if spec.get("rss_trace"):
                        timings.setdefault("rss", []).append((cur["round"], key, _proc_status()["VmRSS"]))
            return wrapper

        SS = algorithm.ServerState
        if hasattr(Coordinator, "decode"):  # the coordinator decodes each client's uplink as it arrives
            orig_cdecode = Coordinator.decode

            def cdecode(self, j, frames, *a, **kw):
                counts["decode_frames"] += len(frames)
                return orig_cdecode(self, j, frames, *a, **kw)
            Coordinator.decode = timed("decode", cdecode, "decode_uplinks")
        else:
            orig_decode = SS.decode_uplinks

            def decode_uplinks(self, uplinks, init=False):
                counts["decode_frames"] += sum(len(f) for f in uplinks.values())
                return orig_decode(self, uplinks, init)
            SS.decode_uplinks = timed("decode", decode_uplinks, "decode_uplinks")
        SS.apply_decoded = timed("aggregate", SS.apply_decoded)
        SS.step = timed("step", SS.step, "step")
        algorithm.lmo_all = timed("lmo", algorithm.lmo_all)
        Plan.build = classmethod(timed("plan", Plan.build.__func__, "plan_build"))

        class TimedReassembler(chunking.Reassembler):
            def __init__(self, *a, **kw):
                self._t0 = time.perf_counter()
                super().__init__(*a, **kw)

            def frames(self):
                out = super().frames()
                timings["recv"].append((cur["round"], self._t0, time.perf_counter()))
                return out
        chunking.Reassembler = TimedReassembler

        orig_process = Coordinator._process

        async def _process(self, k, *a, **kw):
            t0 = time.perf_counter()
            try:
                return await orig_process(self, k, *a, **kw)
            finally:
                t1 = time.perf_counter()
                timings["process"].append((k, t0, t1))
                timings["cpu"].append((k, _cpu_seconds(), t1))
                cur["round"] = k + 1
        Coordinator._process = _process
        orig_record = Coordinator.record_down

        def record_down(self, plan, *a, **kw):
            timings["record_down"].append((plan.round - 1, time.perf_counter(), time.perf_counter()))
            return orig_record(self, plan, *a, **kw)
        Coordinator.record_down = record_down

    server_model = ServerModel(names, params, specs)
    del params  # as in a real server: the Coordinator drops the ServerModel's parameters once copied

    async def main() -> dict:
        c = Coordinator(cfg, server_model, quiet=True, leave_timeout=60)

        def ready(port: int) -> None:
            print(json.dumps({"port": port, "pid": os.getpid(), **_proc_status()}), flush=True)
        return await serve(c, "127.0.0.1", 0, on_ready=ready)

    t0 = time.perf_counter()
    asyncio.run(main())
    print(json.dumps({"timings": timings, "counts": counts, "seconds": time.perf_counter() - t0,
                      "cpu_total": _cpu_seconds(), **_proc_status()}), flush=True)


def _worker_main(spec: dict) -> None:
    """A real efmuon Worker for the synthetic model (memory bench)."""

    layers = synthetic_layers(spec["params"])
    model = SyntheticModule.build(layers, seed=1)
    trace = []
    if spec.get("rss_trace"):  # RSS after each step of the worker's loop (attribution only)

        def traced(owner, name):
            fn = getattr(owner, name)

            def wrapper(*a, **kw):
                try:
                    return fn(*a, **kw)
                finally:
                    trace.append((name, _proc_status()["VmRSS"]))
            setattr(owner, name, wrapper)
        for owner, name in ((Worker, "join"), (Worker, "exchange"), (Worker, "_gradients"),
                            (WorkerState, "apply_downlink"), (WorkerState, "make_uplink"),
                            (WorkerState, "init_uplink")):
            traced(owner, name)
        trace.append(("model built", _proc_status()["VmRSS"]))
    w = Worker(model, SyntheticModule.loss, lambda k: None, server=spec["server"], client_id=spec["client_id"],
               measure_wire=spec.get("measure_wire", True))
    w.run()
    print(json.dumps({"client_id": spec["client_id"], "rss_trace": trace, **_proc_status()}), flush=True)


def _idle_main(spec: dict) -> None:
    """Framework baseline: the imports of a server and a worker, a torch op, nothing else."""
    import torch

    torch.randn(16, 16) @ torch.randn(16, 16)
    print(json.dumps(_proc_status()), flush=True)


# ------------------------------------------------------------------------------------ scaling
class _SynthClient:
    """A light client: Join (W is received and dropped), then per round one Exchange of
    precomputed Submission messages; the downlink is received and dropped.  `compute_s` > 0 emulates
    a worker on another machine: before each round's submission (rounds >= 1, after the previous
    downlink arrived) it sleeps as long as its gradient step would take, without using a core here."""

    def __init__(self, address: str, client_id: int, fingerprint, messages_for, rounds: int,
                 compute_s: float = 0.0):
        import grpc

        self.channel = grpc.insecure_channel(address, options=protocol.CHANNEL_OPTIONS)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.j, self.fp, self.messages_for, self.rounds = client_id, fingerprint, messages_for, rounds
        self.compute_s = compute_s
        self.error: BaseException | None = None
        self.round_times: list[float] = []

    def run(self) -> None:

        try:
            req = pb.JoinRequest(protocol_version=protocol.PROTOCOL_VERSION, client_id=self.j,
                                 parameters=self.fp, client_name=f"synthetic {self.j}")
            session = None
            for msg in self.stub.Join(req, wait_for_ready=True):
                if msg.WhichOneof("part") == "header":
                    session = msg.header.session
            k = 0
            while True:
                if k >= 1 and self.compute_s > 0:
                    time.sleep(self.compute_s)  # the emulated forward + backward at W_k
                h = pb.SubmissionHeader(client_id=self.j, session=session, round=k, train_loss=float("nan"))
                lengths, chunks = self.messages_for(k)
                h.frame_lengths.extend(lengths)
                t0 = time.perf_counter()
                done = False
                for msg in self.stub.Exchange(iter([pb.Submission(header=h), *chunks])):
                    if msg.WhichOneof("part") == "header":
                        done = msg.header.done
                self.round_times.append(time.perf_counter() - t0)
                if done:
                    break
                k += 1
            self.stub.Leave(pb.LeaveRequest(client_id=self.j, session=session), timeout=60)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
        finally:
            self.channel.close()


def _uplink_messages(params: int, uplink: str, init: str):
    """Precomputed uplink Submission chunk messages (the same frames for every client; the server
    decodes each client's copy separately)."""
    import torch

    layers = synthetic_layers(params)
    specs = assign_norms(layers)
    comps = layer_compressors(specs, uplink, {})
    g = torch.Generator().manual_seed(3)
    frames = [c.encode(torch.randn(s, generator=g) * 1e-3, frame_seed(0, 0, 1, i))
              for i, (c, (_, s)) in enumerate(zip(comps, layers))]
    chunks = [pb.Submission(chunk=c) for c in chunking.iter_chunks(frames)]
    lengths = [len(f) for f in frames]
    payload = sum(lengths)

    def messages_for(k):
        if k == 0 and init == "zero":
            return [], []
        return lengths, chunks
    fp = protocol.fingerprint([n for n, _ in layers], [torch.empty(s) for _, s in layers])
    return messages_for, fp, payload


def _per_round(timings: dict, key: str, rounds: range, span: bool = False) -> list[float]:
    """Per round: the sum of the durations of `key` (or the span first start .. last end)."""
    out = []
    for k in rounds:
        ev = [(t0, t1) for r, t0, t1 in timings[key] if r == k]
        if not ev:
            out.append(0.0)
        elif span:
            out.append(max(t1 for _, t1 in ev) - min(t0 for t0, _ in ev))
        else:
            out.append(sum(t1 - t0 for t0, t1 in ev))
    return out


def _scaling_run(n: int, params: int, rounds: int, uplink: str, downlink: str, messages_for, fp,
                 compute_s: float = 0.0) -> dict:
    spec = {"params": params, "workers": n, "rounds": rounds, "uplink": uplink, "downlink": downlink,
            "init": "zero", "instrument": True}
    proc = _spawn("serve", spec)
    try:
        ready = _read_json(proc)
        clients = [_SynthClient(f"127.0.0.1:{ready['port']}", j, fp, messages_for, rounds, compute_s)
                   for j in range(n)]
        threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [c.error for c in clients if c.error is not None]
        if errors:
            raise RuntimeError(f"synthetic client failed: {errors[0]!r}")
        res = _read_json(proc)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    tm, counts = res["timings"], res["counts"]
    # rounds 2..R are measured (round 0 = the empty init submission, round 1 = warm-up)
    measured = range(2, rounds + 1)
    ends = {k: t1 for k, _, t1 in tm["process"]}
    cpu = {k: c for k, c, _ in tm["cpu"]}
    round_s = [ends[k] - ends[k - 1] for k in measured]
    cpu_s = [cpu[k] - cpu[k - 1] for k in measured]
    decode = _per_round(tm, "decode", measured)
    aggregate = _per_round(tm, "aggregate", measured)
    lmo = _per_round(tm, "lmo", measured)
    step = _per_round(tm, "step", measured)
    plan = _per_round(tm, "plan", measured)
    recv_span = _per_round(tm, "recv", measured, span=True)
    # send: from S_k published (end of _process(k-1)) to the last client's stream of it ended
    send = []
    for k in measured:
        ev = [t1 for r, _, t1 in tm["record_down"] if r == k - 1]
        send.append(max(ev) - ends[k - 1] if ev else 0.0)
    med = statistics.median
    busy = [d + a + s + p for d, a, s, p in zip(decode, aggregate, step, plan)]
    return {"workers": n, "worker_compute_s": compute_s, "rounds": len(measured), "round_s": med(round_s),
            "server_cpu_s": med(cpu_s),
            "recv_s": med(recv_span), "decode_s": med(decode), "aggregate_s": med(aggregate),
            "decode_aggregate_s": med([d + a for d, a in zip(decode, aggregate)]), "lmo_s": med(lmo),
            "down_encode_s": med([s - m + p for s, m, p in zip(step, lmo, plan)]), "send_s": med(send),
            "compute_busy_s": med(busy), "cpu_per_round": med(cpu_s) / med(round_s),
            "busy_per_round": med(busy) / med(round_s), "lmo_share": med(lmo) / med(busy),
            "step_calls": counts["step"], "plan_builds": counts["plan_build"],
            "decode_calls": counts["decode_uplinks"], "decoded_frames": counts["decode_frames"],
            "total_rounds": rounds}


EMULATED_CONTEXT = 256  # tokens per sequence of the emulated workers' model
EMULATED_TOKENS = 2048  # tokens per worker step the emulated workers compute (8 sequences x 256)


def _worker_step_model(params: int) -> dict:
    """gpt-char options of a transformer with about `params` parameters (12 d^2 per block)."""
    d = 384 if params >= 5_000_000 else 128
    return {"d_model": d, "n_layers": max(1, round(params / (12 * d * d))), "n_heads": d // 64,
            "context": EMULATED_CONTEXT}


def _measure_worker_step(params: int) -> dict:
    """A REAL forward + backward of a gpt-char transformer of ~`params` parameters in this process,
    at 1 and 4 sequences of EMULATED_CONTEXT tokens, with every core this process may use (a worker
    machine like this one, computing alone: fastest of 4 runs): t(tokens) = fixed_s + tokens * per_token_s."""
    import torch

    opts = _worker_step_model(params)
    before = torch.get_num_threads()
    threads = available_cores()
    torch.set_num_threads(threads)
    try:
        times = {}
        for seqs in (1, 4):
            task = make_task("gpt-char", 1, **opts, batch_size=seqs)
            model = task.build_model()
            batch = task.batch(0, 0)

            def step():
                model.zero_grad(set_to_none=True)
                task.loss(model, batch).backward()
            step()  # warm-up
            runs = []
            for _ in range(4):
                t0 = time.perf_counter()
                step()
                runs.append(time.perf_counter() - t0)
            times[seqs] = min(runs)  # the machine is shared: the fastest run is the step's own cost
        n_params = sum(p.numel() for p in model.parameters())
    finally:
        torch.set_num_threads(before)
    per_token = max((times[4] - times[1]) / (3 * EMULATED_CONTEXT), 1e-12)
    fixed = max(times[1] - EMULATED_CONTEXT * per_token, 0.0)
    return {"params": n_params, "threads": threads, "per_token_s": per_token, "fixed_s": fixed,
            "seq1_s": times[1], "seq4_s": times[4], **opts}


@bench("scaling")
def bench_scaling(quick: bool) -> dict:
    """Round time and server CPU per round vs workers (synthetic clients), split into phases; once
    with zero-compute clients (upper bound) and once with clients that take as long per round as a
    real forward + backward of a model of the same size at EMULATED_TOKENS tokens, measured here."""

    params = (1 << 20) if quick else 10_485_760
    workers = [1, 2, 4] if quick else [1, 2, 4, 8, 16, 32]
    rounds = 3 if quick else 6
    uplink = downlink = "topk:0.1"
    messages_for, fp, payload = _uplink_messages(params, uplink, "zero")
    ws = _measure_worker_step(params)
    compute_s = ws["fixed_s"] + EMULATED_TOKENS * ws["per_token_s"]
    print(f"  worker step (real forward + backward, gpt-char d_model {ws['d_model']} x {ws['n_layers']} layers, "
          f"{ws['params'] / 1e6:.2f}M params, {ws['threads']} threads): {ws['fixed_s'] * 1e3:.1f} ms + "
          f"{ws['per_token_s'] * 1e6:.1f} us/token -> {compute_s:.3f} s at {EMULATED_TOKENS} tokens", flush=True)
    rows = []
    for emulated in (False, True):
        for n in workers:
            r = _scaling_run(n, params, rounds, uplink, downlink, messages_for, fp, compute_s if emulated else 0.0)
            r["clients"] = f"gpt step {EMULATED_TOKENS} tok" if emulated else "zero-compute"
            r["uplink_MB_per_worker"] = payload / 1e6
            # tokens per worker step at which the worker's gradient step takes as long as the server's compute
            r["break_even_tokens"] = max(0.0, (r["compute_busy_s"] - ws["fixed_s"]) / ws["per_token_s"])
            rows.append(r)
            print(f"  {r['clients']:>20s} {n:2d} workers: round {r['round_s'] * 1e3:8.1f} ms  server cpu "
                  f"{r['server_cpu_s'] * 1e3:8.1f} ms  decode+agg {r['decode_aggregate_s'] * 1e3:7.1f} ms  lmo "
                  f"{r['lmo_s'] * 1e3:7.1f} ms  busy/round {r['busy_per_round']:.2f}  break-even "
                  f"{r['break_even_tokens']:.0f} tokens", flush=True)
    zero = [r for r in rows if not r["worker_compute_s"]]
    emul = [r for r in rows if r["worker_compute_s"]]
    xs = [r["workers"] for r in zero]
    a, b, r2 = _linfit(xs, [r["decode_aggregate_s"] for r in zero])
    once = all(r["step_calls"] == r["total_rounds"] and r["plan_builds"] == r["total_rounds"] + 1 for r in rows)
    layers = synthetic_layers(params)
    one_pass = all(r["decode_calls"] == r["workers"] * r["total_rounds"]
                   and r["decoded_frames"] == r["decode_calls"] * len(layers) for r in rows)
    worst_zero = max(r["busy_per_round"] for r in zero if r["workers"] < 16)
    worst_emul = max(r["busy_per_round"] for r in emul if r["workers"] < 16)
    worst_be = max(r["break_even_tokens"] for r in zero if r["workers"] < 16)
    goals = [
        goal(f"decode + aggregate linear in workers: per-worker cost {b * 1e3:.2f} ms (intercept {a * 1e3:.1f} ms), "
             f"r^2 of the linear fit; one decode per uplink frame: {one_pass}", round(r2, 4), "r^2 >= 0.9, one pass",
             r2 >= 0.9 and one_pass),
        goal("downlink encoded once per round (ServerState.step calls == rounds, Plan.build == rounds + 1 incl. done)",
             once, "True", once),
        goal(f"server compute busy time / round time below 16 workers (worst), workers emulated at a real "
             f"{ws['params'] / 1e6:.1f}M-parameter forward + backward of {EMULATED_TOKENS} tokens "
             f"({compute_s:.2f} s)", round(worst_emul, 3), "< 0.5", worst_emul < 0.5),
        goal("server compute busy time / round time below 16 workers (worst), zero-compute clients (upper bound)",
             round(worst_zero, 3), "< 0.5 (reported)", worst_zero < 0.5),
        goal("break-even worker batch below 16 workers (worst): tokens per worker step at which its forward + "
             "backward takes as long as the server's compute per round", round(worst_be), "reported", True),
        goal("server process CPU time / round time below 16 workers (worst), zero-compute clients",
             round(max(r["cpu_per_round"] for r in zero if r["workers"] < 16), 3), "< 0.5 (reported)",
             max(r["cpu_per_round"] for r in zero if r["workers"] < 16) < 0.5),
    ]
    cols = ["clients", "workers", "worker_compute_s", "round_s", "server_cpu_s", "recv_s", "decode_s", "aggregate_s",
            "lmo_s", "down_encode_s", "send_s", "compute_busy_s", "lmo_share", "busy_per_round", "cpu_per_round",
            "break_even_tokens", "step_calls", "decode_calls"]
    lmo_flops = 5 * sum(ns_step_flops(*s) for _, s in layers)
    notes = (f"Synthetic model: {len(layers)} spectral {layers[0][1][0]}x{layers[0][1][1]} matrices "
             f"({params / 1e6:.1f}M parameters), uplink {uplink}, downlink {downlink} ({payload / 1e6:.2f} MB uplink "
             f"per worker per round), init zero. Server: torch threads 1 (--threads), Newton-Schulz "
             f"({lmo_flops / 1e9:.0f} GFLOP per round) on lmo.lmo_threads = {lmo_threads(lmo_flops)} threads (every "
             f"core of the process: nothing else of a synchronous run computes during the server's step). The real "
             f"Coordinator + ParameterServer servicer run in a subprocess; the workers are light synthetic clients "
             f"(threads in the bench process: Join, then one Exchange per round of precomputed Submission messages, "
             f"downlink received and dropped). Two kinds of clients: 'zero-compute' (no gradient computation: the "
             f"round is server + transport only, so busy_per_round is an upper bound) and 'gpt step' = EMULATED "
             f"workers on other machines: each sleeps, per round before submitting, as long as a REAL forward + "
             f"backward of a gpt-char transformer (d_model {ws['d_model']}, {ws['n_layers']} layers, context "
             f"{EMULATED_CONTEXT}, {ws['params'] / 1e6:.2f}M parameters) takes at {EMULATED_TOKENS} tokens per step, "
             f"measured in this run in the bench process with {ws['threads']} threads (fastest of 4 runs each): {ws['fixed_s'] * 1e3:.1f} ms "
             f"+ {ws['per_token_s'] * 1e6:.1f} us/token (1 and 4 sequences: {ws['seq1_s']:.3f} / {ws['seq4_s']:.3f} "
             f"s) = {compute_s:.3f} s (worker_compute_s); sleeping leaves the shared cores to the server. "
             f"break_even_tokens = tokens per worker step at which that forward + backward takes as long as the "
             f"server's compute_busy_s of the row (0: even a step of a few tokens outlasts it). Medians over rounds 2..{rounds} (round 1 warms up). "
             f"Phases (timed inside the server process by wrapping methods, never in the product code): "
             f"recv_s = first Reassembler created .. last frames() of the round (the uplink streams, overlapping "
             f"decode); decode_s = ServerState.decode_uplinks summed over clients; aggregate_s = apply_decoded; "
             f"lmo_s = lmo_all; down_encode_s = step() minus LMO (steps, X/W update, C_down encode + decode) + "
             f"Plan.build (chunking, once); send_s = S published .. the last client's reply stream ended; "
             f"compute_busy_s = decode + aggregate + step + Plan.build (the server's compute thread); lmo_share = "
             f"lmo_s / compute_busy_s; "
             f"busy_per_round = compute_busy_s / round_s; cpu_per_round = server process CPU (all threads incl. "
             f"gRPC) / round_s. Server 'not the bottleneck' = busy_per_round < 0.5: the workers wait on the "
             f"server's compute for less than half the round. On this 2-core machine the synthetic clients and the "
             f"server share the cores.")
    return {"result": rows, "goals": goals, "table": notes + "\n\n" + table(rows, cols), "worker_step": ws}


# ------------------------------------------------------------------------------------- memory
def _memory_run(params: int, workers: int, rounds: int, uplink: str, downlink: str, trace: bool = False) -> dict:
    spec = {"params": params, "workers": workers, "rounds": rounds, "uplink": uplink, "downlink": downlink,
            "init": "grad", "instrument": trace, "rss_trace": trace}
    server = _spawn("serve", spec)
    procs = []
    try:
        ready = _read_json(server)
        for j in range(workers):
            procs.append(_spawn("worker", {"params": params, "server": f"127.0.0.1:{ready['port']}",
                                           "client_id": j, "rss_trace": trace}))
        wres = [_read_json(p) for p in procs]
        sres = _read_json(server)
        for p in procs + [server]:
            p.wait(60)
    finally:
        for p in procs + [server]:
            if p.poll() is None:
                p.kill()
    return {"server_hwm": sres["VmHWM"], "server_ready_rss": ready["VmRSS"],
            "worker_hwm": max(w["VmHWM"] for w in wres), "rss_trace": sres["timings"].get("rss"),
            "worker_trace": wres[0].get("rss_trace"), "worker0_hwm": wres[0]["VmHWM"]}


WORKER_BOUND_COPIES = 5  # 4 model copies + the gradient (1)


@bench("memory")
def bench_memory(quick: bool) -> dict:
    """Peak RSS of the server and a worker process vs model size, minus an idle framework process."""
    sizes = [1_000_000, 4_000_000] if quick else [1_000_000, 10_000_000, 50_000_000]
    workers, rounds = 2, 2
    uplink = downlink = "identity"  # the largest frames: one round's frames are (n + 1) model copies
    idle_p = _spawn("idle", {})
    idle = _read_json(idle_p)["VmHWM"]
    idle_p.wait(30)
    rows = []
    for p in sizes:
        n_actual = sum(s[0] * s[1] for _, s in synthetic_layers(p))
        model = 4 * n_actual
        r = _memory_run(p, workers, rounds, uplink, downlink)
        s_net, w_net = r["server_hwm"] - idle, r["worker_hwm"] - idle
        s_bound = (3 + workers + (workers + 1)) * model  # X W G + G_j per client + one round's frames
        w_bound = WORKER_BOUND_COPIES * model
        rows.append({"params": n_actual, "model_MB": model / 1e6, "idle_MB": idle / 1e6,
                     "server_peak_MB": r["server_hwm"] / 1e6, "server_net_MB": s_net / 1e6,
                     "server_copies": s_net / model, "server_bound_copies": s_bound / model,
                     "worker_peak_MB": r["worker_hwm"] / 1e6, "worker_net_MB": w_net / 1e6,
                     "worker_copies": w_net / model, "worker_bound_copies": w_bound / model})
        print(f"  {n_actual / 1e6:5.1f}M params: server {s_net / 1e6:8.1f} MB over idle ({s_net / model:.2f} "
              f"copies, bound {s_bound / model:.0f})  worker {w_net / 1e6:8.1f} MB ({w_net / model:.2f} copies, "
              f"bound {w_bound / model:.0f})",
              flush=True)
    big = rows[-1]  # the largest model: the framework's own growth is smallest relative to it
    mid = rows[len(rows) // 2]  # 10M (4M with --quick)
    goals = [
        goal(f"server peak RSS over idle, in model copies (largest model; bound = 3 + n G_j + one round's "
             f"frames (n + 1) with n = {workers}, identity)", round(big["server_copies"], 2),
             f"<= {big['server_bound_copies']:.0f}", big["server_copies"] <= big["server_bound_copies"]),
        goal("worker peak RSS over idle, in model copies (largest model; bound = 4 + 1 the gradient)",
             round(big["worker_copies"], 2), f"<= {WORKER_BOUND_COPIES}", big["worker_copies"] <= WORKER_BOUND_COPIES),
        goal("server peak RSS over idle, in model copies (10M parameters)", round(mid["server_copies"], 2),
             f"<= {mid['server_bound_copies']:.0f}", mid["server_copies"] <= mid["server_bound_copies"]),
        goal("worker peak RSS over idle, in model copies (10M parameters; bound = 4 + 1 the gradient)",
             round(mid["worker_copies"], 2), f"<= {WORKER_BOUND_COPIES}", mid["worker_copies"] <= WORKER_BOUND_COPIES),
        goal("server peak RSS over idle, in model copies (smallest model)", round(rows[0]["server_copies"], 2),
             f"<= {rows[0]['server_bound_copies']:.0f}", rows[0]["server_copies"] <= rows[0]["server_bound_copies"]),
        goal("worker peak RSS over idle, in model copies (smallest model)", round(rows[0]["worker_copies"], 2),
             f"<= {WORKER_BOUND_COPIES}", rows[0]["worker_copies"] <= WORKER_BOUND_COPIES),
    ]
    cols = ["params", "model_MB", "idle_MB", "server_peak_MB", "server_net_MB", "server_copies",
            "server_bound_copies", "worker_peak_MB", "worker_net_MB", "worker_copies", "worker_bound_copies"]
    notes = (f"Peak RSS = VmHWM of each process at its exit (/proc/self/status). Server: the real Coordinator + "
             f"servicer for a synthetic model of spectral 256x1024 matrices, {workers} real `efmuon.worker.Worker` "
             f"processes (loss 0.5 sum p^2), {rounds} rounds, init grad, {uplink} both ways (the largest frames). "
             f"idle = VmHWM of a process that imported torch, efmuon.server.service and efmuon.worker.client and "
             f"ran one matmul (the framework baseline, subtracted). copies = (peak - idle) / (4 bytes x params). "
             f"Worker bound = 4 (W, M_j, G_j, one round's frames) + 1: the gradient autograd allocates at "
             f"backward (p.grad), the part of 'the framework's own' that scales with the model (the synthetic "
             f"loss has no activations).")
    return {"result": rows, "goals": goals, "table": notes + "\n\n" + table(rows, cols) + MEMORY_NOTES}


# From `_memory_run(10_000_000, 2, 2, "identity", "identity", trace=True)` and /proc/PID/smaps at each
# round (server: wrapped ServerState/Coordinator methods; worker: wrapped Worker/WorkerState methods).
MEMORY_NOTES = """

Where the copies come from (RSS over idle, in model copies):
- server: X, W, G and the two G_j 5; while a round's uplinks arrive + one R_j per client (n = 2): each
  client's reassembled frames are decoded frame by frame into R_j, R_j is applied and freed in
  `apply_decoded` (a client's first G_j takes the decoded R_j over, no copy); the previous downlink's
  chunks are freed once every client has *started* its next submission (before: once n - 1 had been
  accepted, i.e. usually only at the step, one copy more during reception); the step takes the LMO in
  blocks of 1/8 of the model (`ServerState.lmo_blocks`: Newton-Schulz holds ~3.5 copies of what it
  is given) and cuts the downlink into chunks frame by frame. The peak is when both R_j are complete:
  5 + 2 = 7, plus what gRPC's C core still holds of the two streams: it reads ahead as far as its
  flow-control window, which its BDP probe grows on loopback (small heap buffers, 0.5-2 copies, varying
  from run to run with the scheduling on 2 shared cores). Back to back at 50M, the servicer with
  ("grpc.http2.bdp_probe", 0) peaked at 7.85 copies, with the default at 9.1: the remaining gap is
  that read-ahead, a transport setting (server/service.py) traded against throughput on long links.
  Four full runs of this bench gave 8.93, 9.08, 7.36, 9.05 server copies at 50M and 8.32, 7.61,
  7.48, 7.46 at 10M (workers 4.71, 4.71, 4.13, 4.12 and 4.82, 4.59, 4.58, 4.53).
- worker: W, M_j, G_j 3 (the model's parameters are views of W: `Worker._bind_model`), plus either the
  gradient 1 (handed over from p.grad, freed layer by layer in make_uplink as the uplink frames fill
  up) or, in Exchange, the uplink frames until the reply's header arrives (then freed: the server has
  applied the round) and the downlink buffer + decoded S frame by frame, plus gRPC's buffers.
- Allocator: glibc's mmap threshold is fixed at 64 KiB (`training.return_freed_memory`) for models of
  >= 16 MiB, before the model copies are allocated; `training.trim_heap` (malloc_trim) returns the heap
  pages of the caller-built model once it is dropped or bound to W, after every downlink on a worker and
  after every step on the server. The 1M row (4 MB) is below that size on purpose (on small models the
  page faults cost more time than the memory is worth; BENCHMARKS' default run); with the tuning forced
  (MALLOC_MMAP_THRESHOLD_=65536) it measured server 11.4 and worker 8.8 copies, i.e. 45 / 35 MB over
  idle of which 20-25 MB are per-process costs that do not scale with the model (gRPC channel and
  threads, the worker's relay, imports beyond the idle process's, allocator arenas).
- Changed since the previous measurement (server 8.72, worker 6.15 copies at 50M): the worker's model
  aliases W, its uplink frames are freed when the reply begins, the last downlink is released when
  every client started submitting, the LMO runs in blocks, first estimators are adopted without a
  copy, and the allocator tuning moved from >= 64 MiB / 256 KiB to >= 16 MiB / 64 KiB plus trims."""


# --------------------------------------------------------------------------------- bytes-wire
def _best_pairing() -> tuple[str, str]:
    """The project's default pairing, which `efmuon bench bytes` names as the best (BENCHMARKS.md)."""

    return DEFAULT_UPLINK, DEFAULT_DOWNLINK


@bench("bytes-wire")
def bench_bytes_wire(quick: bool) -> dict:
    """Payload vs wire bytes both ways through run_local (real server + worker processes)."""

    up, down = _best_pairing()
    task, rounds = ("lsq", 20) if quick else ("gpt-char", 30)
    rows = []
    for uplink, downlink in [("identity", "identity"), (up, down)]:
        cfg = RunConfig(task=task, workers=2 if quick else 4, rounds=rounds, uplink=uplink, downlink=downlink)
        t0 = time.perf_counter()
        rep = run_local(cfg, quiet=True)
        s = rep["summary"]
        row = {"task": task, "uplink": uplink, "downlink": downlink, "rounds": rounds, "workers": cfg.workers}
        for d in ("up", "down"):
            tot = {lvl: (s["bytes"][d].get(lvl) or 0) + (s["init_bytes"][d].get(lvl) or 0)
                   for lvl in ("payload", "message", "wire")}
            row[f"{d}_payload_MB"] = tot["payload"] / 1e6
            row[f"{d}_message_MB"] = tot["message"] / 1e6
            row[f"{d}_wire_MB"] = tot["wire"] / 1e6
            row[f"{d}_wire/payload"] = tot["wire"] / tot["payload"] if tot["payload"] else None
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {uplink}/{downlink}: up wire/payload {row['up_wire/payload']:.4f}  "
              f"down {row['down_wire/payload']:.4f}  ({row['seconds']:.0f} s)", flush=True)
    goals = [goal(f"{r['uplink']}/{r['downlink']} wire/payload (worst direction, incl. the join phase)",
                  round(max(r["up_wire/payload"], r["down_wire/payload"]), 4), "<= 1.01",
                  max(r["up_wire/payload"], r["down_wire/payload"]) <= 1.01)
             for r in rows]
    cols = ["task", "workers", "rounds", "uplink", "downlink", "up_payload_MB", "up_message_MB", "up_wire_MB",
            "up_wire/payload", "down_payload_MB", "down_message_MB", "down_wire_MB", "down_wire/payload"]
    notes = (f"`efmuon.server.app.run_local`: the server in this process and real worker processes on 127.0.0.1; "
             f"totals over all clients, rounds and the join phase (initial W down, init gradients up). wire = "
             f"bytes each worker's TCP connection carried (its CountingRelay), incl. Status/Join/Leave calls, "
             f"HTTP/2 and gRPC framing. The compressed pairing is the project default "
             f"({up} / {down}), the best of the `bytes` section.")
    return {"result": rows, "goals": goals, "table": notes + "\n\n" + table(rows, cols)}


# --------------------------------------------------------------------------------------- main
if __name__ == "__main__":
    _mode, _spec = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    {"sink": _sink_main, "serve": _serve_main, "worker": _worker_main, "idle": _idle_main}[_mode](_spec)

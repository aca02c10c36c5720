"""Tests for efmuon.common.links: the counting relay, link shaping and link specs."""
from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import threading
import time

import grpc
import pytest
from efmuon.common.errors import ConfigError
from efmuon.common.links import PRESETS, LinkProfile, parse_link
from efmuon.worker import shaping
from efmuon.worker.relay import CountingRelay

MB = 1_000_000


# ---------------------------------------------------------------------------------------------
# helpers: a threaded plain-socket server on 127.0.0.1, port 0
# ---------------------------------------------------------------------------------------------


class TcpServer:
    """Runs handler(conn) in a thread per accepted connection."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.results: list = []
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            r = self.handler(c)
            if r is not None:
                self.results.append(r)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def echo_handler(c: socket.socket):
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        n = c.recv_into(buf)
        if not n:
            return
        c.sendall(view[:n])


def recv_all(s: socket.socket, limit: int | None = None) -> tuple[int, str]:
    """Read until EOF (or limit bytes); return (count, sha256)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    got = 0
    while limit is None or got < limit:
        n = s.recv_into(buf)
        if not n:
            break
        h.update(memoryview(buf)[:n])
        got += n
    return got, h.hexdigest()


def send_in_thread(s: socket.socket, data: bytes, shut: bool = True) -> threading.Thread:
    def run():
        try:
            view = memoryview(data)
            for i in range(0, len(data), 1 << 20):
                s.sendall(view[i:i + (1 << 20)])
            if shut:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture
def echo_server():
    srv = TcpServer(echo_handler)
    yield srv
    srv.close()


# ---------------------------------------------------------------------------------------------
# relay: exact forwarding and counting
# ---------------------------------------------------------------------------------------------


def test_relay_forwards_50mb_both_ways_exactly(echo_server):
    data = random.Random(1).randbytes(50 * MB)
    with CountingRelay("127.0.0.1", echo_server.port) as relay:
        s = socket.create_connection(relay.address)
        t = send_in_thread(s, data)  # then half-closes; the echo server closes after echoing all
        got, digest = recv_all(s)
        t.join(10)
        s.close()
        assert got == len(data)
        assert digest == hashlib.sha256(data).hexdigest()
        assert relay.counters() == {"up": len(data), "down": len(data)}
        assert relay.connections == 1


def test_half_close_reply_after_eof_and_counters_sum_over_connections():
    def digest_handler(c):  # read to EOF, then answer with the sha256 of what arrived
        n, d = recv_all(c)
        c.sendall(d.encode())
        return n

    srv = TcpServer(digest_handler)
    try:
        with CountingRelay("127.0.0.1", srv.port) as relay:
            sizes = [1_000_000, 3_000_001, 17]
            socks, threads, payloads = [], [], []
            for i, size in enumerate(sizes):
                payload = random.Random(i).randbytes(size)
                s = socket.create_connection(relay.address)
                socks.append(s)
                payloads.append(payload)
                threads.append(send_in_thread(s, payload))
            for s, payload, t in zip(socks, payloads, threads):
                t.join(10)
                s.settimeout(10)
                reply = b""
                while chunk := s.recv(100):
                    reply += chunk
                s.close()
                assert reply == hashlib.sha256(payload).hexdigest().encode()
            assert relay.counters() == {"up": sum(sizes), "down": 64 * len(sizes)}
            assert relay.connections == 3
    finally:
        srv.close()


def test_unreachable_target_closes_client():
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    with CountingRelay("127.0.0.1", port) as relay:
        s = socket.create_connection(relay.address)
        s.settimeout(5)
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        s.close()
        assert relay.counters() == {"up": 0, "down": 0}


def test_stop_with_open_connections_does_not_hang_and_buffering_is_bounded():
    hold = threading.Event()

    def stall_handler(c):  # accept, never read, keep the connection open
        hold.wait(20)

    srv = TcpServer(stall_handler)
    relay = CountingRelay("127.0.0.1", srv.port)
    relay.start()
    try:
        idle = socket.create_connection(relay.address)
        busy = socket.create_connection(relay.address)
        busy.settimeout(10)
        sender = send_in_thread(busy, bytes(200 * MB), shut=False)
        deadline = time.monotonic() + 30
        while relay.counters()["up"] == 0:  # the transfer has begun
            assert time.monotonic() < deadline, "the relay read nothing"
            time.sleep(0.01)
        time.sleep(0.7)
        # The target does not read: the relay must stop reading too, not buffer the 200 MB. What it
        # read is bounded by socket buffers and its one buffer, however long the test waits.
        up = relay.counters()["up"]
        assert 0 < up < 24 * MB, up
        thread = relay._thread
        relay.stop()
        assert not thread.is_alive()  # the loop ended and was joined: the open connections did not hold it
        relay.stop()  # idempotent
        # the client sees its connection end
        idle.settimeout(5)
        try:
            assert idle.recv(10) == b""
        except ConnectionResetError:
            pass
        sender.join(10)
        assert not sender.is_alive()
        idle.close()
        busy.close()
    finally:
        hold.set()
        relay.stop()
        srv.close()


def test_stop_before_start_and_twice():
    r = CountingRelay("127.0.0.1", 1)
    r.stop()
    r.stop()
    with pytest.raises(RuntimeError):
        r.start()


# ---------------------------------------------------------------------------------------------
# relay carrying gRPC
# ---------------------------------------------------------------------------------------------


async def _unary(request: bytes, context) -> bytes:
    return request


async def _stream(request_iterator, context):
    async for chunk in request_iterator:
        yield chunk


async def _start_grpc_server():
    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_grpc_unary_and_streaming_through_relay():
    server, port = await _start_grpc_server()
    relay = CountingRelay("127.0.0.1", port)
    host, rport = relay.start()
    try:
        async with grpc.aio.insecure_channel(f"{host}:{rport}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            stream = channel.stream_stream("/test.Echo/Stream")
            payload = random.Random(2).randbytes(1_000_000)
            assert await unary(payload, timeout=10) == payload
            chunks = [random.Random(10 + i).randbytes(200_000) for i in range(10)]
            got = [c async for c in stream(iter(chunks), timeout=10)]
            assert got == chunks
        sent = len(payload) + sum(map(len, chunks))
        c = relay.counters()
        assert c["up"] >= sent and c["down"] >= sent
        assert c["up"] < 1.05 * sent + 100_000  # framing overhead is small
        assert relay.connections == 1
    finally:
        relay.stop()
        await server.stop(None)


async def test_grpc_call_through_delayed_link_takes_a_round_trip():
    server, port = await _start_grpc_server()
    relay = CountingRelay("127.0.0.1", port, link=LinkProfile(delay_s=0.025))
    host, rport = relay.start()
    try:
        async with grpc.aio.insecure_channel(f"{host}:{rport}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            assert await unary(b"warm-up", timeout=10) == b"warm-up"
            t0 = time.monotonic()
            assert await unary(b"x" * 1000, timeout=10) == b"x" * 1000
            dt = time.monotonic() - t0
        assert dt >= 0.050, dt  # a round trip of the delay at least (the delay itself: the fake-clock tests)
    finally:
        relay.stop()
        await server.stop(None)


# ---------------------------------------------------------------------------------------------
# shaping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [1e6, 10e6, 100e6])
def test_uplink_rate(rate):
    nbytes = int(rate / 8 * 1.0)  # ~1 s of data
    done = {}

    def sink(c):
        n, _ = recv_all(c)
        done["t"] = time.monotonic()
        done["n"] = n

    srv = TcpServer(sink)
    try:
        with CountingRelay("127.0.0.1", srv.port, link=LinkProfile(up_bps=rate)) as relay:
            t0 = time.monotonic()
            s = socket.create_connection(relay.address)
            send_in_thread(s, bytes(nbytes)).join(10)
            deadline = time.monotonic() + 10
            while "t" not in done and time.monotonic() < deadline:
                time.sleep(0.005)
            s.close()
            assert done["n"] == nbytes
            # an upper bound only: the bucket is born empty after t0, so by any moment it let out at
            # most rate x the time since; a loaded machine is slower, never faster
            achieved = nbytes * 8 / (done["t"] - t0)
            assert achieved <= rate * 1.01, (rate, achieved)
            assert relay.counters()["up"] == nbytes
    finally:
        srv.close()


@pytest.mark.parametrize("rate", [1e6, 10e6, 100e6])
def test_downlink_rate(rate):
    nbytes = int(rate / 8 * 0.6)

    def source(c):
        c.recv(1)
        c.sendall(bytes(nbytes))

    srv = TcpServer(source)
    try:
        with CountingRelay("127.0.0.1", srv.port, link=LinkProfile(down_bps=rate)) as relay:
            s = socket.create_connection(relay.address)
            # let the relay finish connecting so t0 times only the transfer; meanwhile the idle
            # bucket fills to at most its cap (10 ms of rate, 1.7 % of this transfer)
            time.sleep(0.05)
            t0 = time.monotonic()
            s.sendall(b"g")
            n, _ = recv_all(s, nbytes)
            dt = time.monotonic() - t0
            s.close()
            assert n == nbytes
            achieved = nbytes * 8 / dt
            assert achieved <= rate * 1.02, (rate, achieved)  # upper bound only: rate x dt + the cap
    finally:
        srv.close()


def _ping_times(relay: CountingRelay, count: int, size: int = 16) -> list[float]:
    s = socket.create_connection(relay.address)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(count):
        t0 = time.monotonic()
        s.sendall(b"p" * size)
        got = 0
        while got < size:
            got += len(s.recv(size - got))
        times.append(time.monotonic() - t0)
    s.close()
    return times


def test_delay_round_trip_at_least_twice_delay(echo_server):
    with CountingRelay("127.0.0.1", echo_server.port, link=LinkProfile(delay_s=0.040)) as relay:
        times = _ping_times(relay, 3)
    assert all(t >= 0.080 for t in times), times


def test_jitter_keeps_order_and_bytes(echo_server):
    data = random.Random(3).randbytes(3 * MB)
    link = parse_link("up=200mbit,down=200mbit,delay=5ms,jitter=5ms")
    with CountingRelay("127.0.0.1", echo_server.port, link=link, seed=1) as relay:
        s = socket.create_connection(relay.address)
        t = send_in_thread(s, data)
        got, digest = recv_all(s)
        t.join(10)
        s.close()
        assert got == len(data) and digest == hashlib.sha256(data).hexdigest()
        assert relay.counters() == {"up": len(data), "down": len(data)}


def test_loss_adds_retransmission_timeout(echo_server):
    # With loss this high the first 64 KiB of each direction is "lost": one RTO of 200 ms each way.
    link = LinkProfile(delay_s=0.010, loss=0.999)
    with CountingRelay("127.0.0.1", echo_server.port, link=link, seed=0) as relay:
        first, second = _ping_times(relay, 2)
    assert first >= 2 * (0.010 + 0.200), first
    assert second >= 2 * 0.010, second  # (no new draw inside the first 64 KiB: the fake-clock test below)


# ---------------------------------------------------------------------------------------------
# shaping, the mechanism: the delay pump on a fake clock (conftest.RelayClock), exactly
# ---------------------------------------------------------------------------------------------


async def _delay_pump_pings(r: CountingRelay, clock, pings: int, size: int = 16) -> list[float]:
    """Drive `r`'s delay pump (up, no rate: only its writer sleeps) with `pings` separate reads of
    `size` bytes, each forwarded before the next is written; returns each one's wait."""
    src, feed = socket.socketpair()
    dst, out = socket.socketpair()
    src.setblocking(False)
    dst.setblocking(False)
    out.setblocking(False)  # never block this loop: the pump runs on it
    task = asyncio.ensure_future(shaping.pump_delayed(src, dst, r.link, None, r._rng, lambda n: None,
                                                      lambda n: None))
    try:
        for i in range(pings):
            feed.sendall(bytes([i]) * size)
            got, guard = b"", time.monotonic() + 120  # a hang guard, not a timing claim
            while len(got) < size:
                assert time.monotonic() < guard and not task.done(), "the pump did not forward the ping"
                await asyncio.sleep(0.001)  # the real loop's; the pump sleeps on the fake clock
                try:
                    got += out.recv(size - len(got), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
            assert got == bytes([i]) * size
        feed.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 120)  # a hang guard, not a timing claim
    finally:
        task.cancel()
        for s in (src, feed, dst, out):
            s.close()
    assert len(clock.sleeps) == pings
    return clock.sleeps


async def test_delay_pump_holds_each_chunk_for_the_delay_once(relay_clock):
    r = CountingRelay("127.0.0.1", 1, link=LinkProfile(delay_s=0.040))
    waits = await _delay_pump_pings(r, relay_clock, 3)
    assert waits == pytest.approx([0.040] * 3, abs=1e-9)


async def test_delay_pump_jitter_stays_in_its_band(relay_clock):
    r = CountingRelay("127.0.0.1", 1, link=LinkProfile(delay_s=0.010, jitter_s=0.005), seed=3)
    waits = await _delay_pump_pings(r, relay_clock, 20)
    assert all(0.005 - 1e-9 <= w <= 0.015 + 1e-9 for w in waits), waits
    assert len({round(w, 9) for w in waits}) > 1  # it does vary


async def test_delay_pump_loss_is_one_rto_per_64_kib_and_later_chunks_wait_behind_it(relay_clock):
    # loss this high: the chunk that starts the first 64 KiB is held one RTO, max(200 ms, 2 x delay)
    r = CountingRelay("127.0.0.1", 1, link=LinkProfile(delay_s=0.010, loss=0.999), seed=0)
    waits = await _delay_pump_pings(r, relay_clock, 3)
    assert waits == pytest.approx([0.010 + 0.200, 0.010, 0.010], abs=1e-9)  # later pings: no new draw


# ---------------------------------------------------------------------------------------------
# parse_link
# ---------------------------------------------------------------------------------------------


def test_parse_presets():
    assert parse_link("dsl") == LinkProfile(up_bps=1e6, down_bps=16e6, delay_s=0.030)
    assert parse_link("lte") == LinkProfile(up_bps=10e6, down_bps=30e6, delay_s=0.050)
    assert parse_link("wifi") == LinkProfile(up_bps=50e6, down_bps=100e6, delay_s=0.005)
    assert parse_link("DC-10G") == LinkProfile(up_bps=10e9, down_bps=10e9, delay_s=0.00005)
    assert parse_link("none") == LinkProfile() and not parse_link("none").is_shaped
    assert parse_link(None) == LinkProfile()
    assert set(PRESETS) == {"none", "dsl", "lte", "wifi", "dc-10g"}


def test_parse_custom():
    p = parse_link("up=10mbit,down=50mbit,delay=20ms,jitter=5ms,loss=0.1%")
    assert p.up_bps == 10e6 and p.down_bps == 50e6
    assert p.delay_s == pytest.approx(0.020) and p.jitter_s == pytest.approx(0.005)
    assert p.loss == pytest.approx(0.001)
    p = parse_link(" up = 1.5gbit , delay=250us, loss=0.02 ")
    assert p.up_bps == 1.5e9 and p.down_bps is None
    assert p.delay_s == pytest.approx(250e-6) and p.loss == pytest.approx(0.02)
    assert parse_link("down=800kbit,delay=1s").down_bps == 800e3
    assert parse_link("up=512bit").up_bps == 512
    assert parse_link("dsl,delay=50ms") == LinkProfile(up_bps=1e6, down_bps=16e6, delay_s=0.050)
    assert parse_link("lte,up=none").up_bps is None
    for spec in ("dsl", "lte", "wifi", "dc-10g", "none", "up=10mbit,down=50mbit,delay=20ms,jitter=5ms,loss=0.1%"):
        p = parse_link(spec)
        q = parse_link(p.to_spec())
        assert q.up_bps == pytest.approx(p.up_bps) if p.up_bps else q.up_bps is None
        assert q.delay_s == pytest.approx(p.delay_s) and q.loss == pytest.approx(p.loss)


@pytest.mark.parametrize("spec, bad_part", [
    ("", "empty"),
    ("fast", "'fast'"),
    ("up=10", "'up=10'"),
    ("up=10mbps", "'up=10mbps'"),
    ("up=0mbit", "'up=0mbit'"),
    ("up=-1mbit", "'up=-1mbit'"),
    ("delay=20", "'delay=20'"),
    ("delay=abc", "'delay=abc'"),
    ("loss=150%", "'loss=150%'"),
    ("loss=1", "'loss=1'"),
    ("rate=10mbit", "'rate'"),
    ("up=1mbit,up=2mbit", "'up' given twice"),
    ("up=1mbit,dsl", "'dsl'"),
    ("dsl,lte", "'lte'"),
])
def test_parse_bad(spec, bad_part):
    with pytest.raises(ConfigError) as e:
        parse_link(spec)
    msg = str(e.value)
    assert bad_part in msg
    assert "Valid forms" in msg and "mbit" in msg and "ms" in msg
    assert isinstance(e.value, ValueError)


def test_profile_validates():
    with pytest.raises(ConfigError):
        LinkProfile(up_bps=0)
    with pytest.raises(ConfigError):
        LinkProfile(delay_s=-1)
    with pytest.raises(ConfigError):
        LinkProfile(loss=1.0)

"""Wire-byte counting and in-process link emulation for gRPC connections (DESIGN.md section 5).

`CountingRelay` is a TCP relay that runs in the caller's process. A gRPC client channel connects to
the relay instead of the server, and the relay forwards every byte to the real target. Bytes are
counted at the socket, so the counts include everything the connection carried: HTTP/2 and gRPC
framing, and TLS records when TLS is on. IP/TCP headers are not included. This gives the "wire"
figure of DESIGN.md section 5::

    with CountingRelay("127.0.0.1", server_port) as relay:
        host, port = relay.address
        channel = grpc.aio.insecure_channel(f"{host}:{port}")
        ...
        relay.counters()  # {"up": bytes client->server, "down": bytes server->client}

With a `LinkProfile`, the relay also shapes each direction. That is emulation level (a) of the
design: it needs no root, and TCP ends at the relay on both sides, so it reproduces rate and latency
as the application sees them (including HTTP/2 window updates), but not kernel congestion control
over a long path. In each direction:

* rate: a token bucket with debt accounting. It refills from `time.monotonic()`, tokens may go
  negative, and the sleep pays back the debt, so sleep overshoot does not lower the rate. The bucket
  starts empty, and its cap is one chunk or 10 ms of rate, whichever is larger. It charges the TCP
  payload bytes the relay forwards. L2/IP/TCP overhead is not included, so the rate is a goodput
  rate. To emulate an L2 rate R, configure about 0.956*R.
* delay: each chunk is forwarded `delay + uniform(-jitter, jitter)` seconds (clamped at >= 0) after
  it has passed the bucket. Order is preserved, so a chunk never overtakes an earlier one. Bytes in
  flight are bounded by rate*(delay+jitter) + 256 KiB. When that bound is reached the relay stops
  reading, and TCP backpressure reaches the sender.
* loss: modelled as the delay of a retransmission, not as dropped bytes (TCP would resend them).
  For each 64 KiB of data, with probability `loss`, the chunk that starts that 64 KiB is held for an
  extra RTO of max(200 ms, 2*delay). Later chunks wait behind it, which is TCP's head-of-line blocking.

Transfer timing (`CountingRelay.take_transfers()`), used for the achieved rate of a link: since the
last call, in each direction, the "data" bytes (reads of >= 256 B; HTTP/2 control frames such as
WINDOW_UPDATE and PING are smaller and neither start nor extend a transfer) and how long they took:

* up (client -> server), measured at the sender: from the moment the relay read the first data
  byte from the client to the moment everything read up to the last data byte was forwarded and
  acknowledged by the server's TCP (the kernel send queue, SIOCOUTQ, is empty; polled every 1 ms).
  So the duration includes the last byte's one-way delay plus its ACK.
* down (server -> client), measured at the receiver: from the delivery of the first data chunk to
  the client to the delivery of the last one; the first chunk's bytes are excluded from the rate
  (the receiver cannot see how long it took), i.e. seconds are extrapolated by bytes/(bytes-first).

Unshaped directions take a fast path: a recv_into loop into one reusable buffer of up to 1 MiB, then
sendall from a memoryview of that buffer. No user-space copies are made beyond that, and nothing is
buffered beyond one buffer per direction: while the destination is not accepting data, the relay
does not read from the source.
"""
from __future__ import annotations

import asyncio
import collections
import fcntl
import random
import socket
import struct
import termios
import threading
import time

from ..common.links import LinkProfile, parse_link

# --------------------------------------------------------------------------------------------------
# Relay
# --------------------------------------------------------------------------------------------------

_SMALL_BUF = 64 * 1024          # first buffer of an unshaped direction
_BIG_BUF = 1024 * 1024          # grown to this once a recv fills the small buffer
_LOSS_SEGMENT = 64 * 1024       # loss is drawn once per this many bytes
_QUEUE_SLACK = 256 * 1024       # in-flight bound = rate*(delay+jitter) + this
_NOMINAL_FAST_BPS = 10e9        # rate used for the in-flight bound when a delayed direction has no rate
_MAX_QUEUE = 64 * 1024 * 1024   # ... and the bound is capped at this
_MIN_RTO = 0.200



def _chunk_size(rate_bps: float | None) -> int:
    """Largest chunk forwarded at once: about 10 ms of rate, a power of two in [1 KiB, 1 MiB], so
    <= 16 KiB below ~26 Mbit/s and the rate is smooth over short windows."""
    if not rate_bps:
        return 256 * 1024
    target = rate_bps / 8 * 0.010
    size = 1024
    while size * 2 <= target and size < _BIG_BUF:
        size *= 2
    return size


class _TokenBucket:
    """Debt-accounting token bucket, in bytes. Starts empty; tokens may go negative."""

    __slots__ = ("rate", "cap", "tokens", "t")

    def __init__(self, rate_bps: float, cap_bytes: float) -> None:
        self.rate = rate_bps / 8.0
        self.cap = float(cap_bytes)
        self.tokens = 0.0
        self.t = time.monotonic()

    def charge(self, n: int) -> float:
        """Take n bytes; return how long to sleep to pay back the debt (0 if none)."""
        now = time.monotonic()
        self.tokens = min(self.cap, self.tokens + (now - self.t) * self.rate) - n
        self.t = now
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.close()
    except OSError:
        pass


_DATA_READ = 256               # reads at least this big are data (control frames are smaller)
_DRAIN_POLL = 0.001            # seconds between SIOCOUTQ polls while an uplink drains


def _outq(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (SIOCOUTQ); 0 on error."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


class _Track:
    """Per connection: uplink bytes read from the client and forwarded to the server."""

    __slots__ = ("read", "fwd", "event")

    def __init__(self) -> None:
        self.read = 0
        self.fwd = 0
        self.event = asyncio.Event()


class _Meter:
    """Timing of one direction's data since the last `take()` (module docstring, transfer timing).
    Mutated on the relay's loop thread under the relay's lock."""

    __slots__ = ("start", "end", "base", "data_total", "first", "pending", "total")

    def __init__(self) -> None:
        self.total = 0  # bytes seen (read for up, delivered for down), never reset
        self.reset()

    def reset(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.base = 0        # total before the first data chunk
        self.first = 0       # bytes of the first data chunk
        self.data_total = 0  # total after the last data chunk
        self.pending = False  # up: data read but not yet drained

    def on_bytes(self, n: int, now: float) -> bool:
        """Count n bytes; returns True when they are data."""
        self.total += n
        if n < _DATA_READ:
            return False
        if self.start is None:
            self.start, self.base, self.first = now, self.total - n, n
        self.data_total = self.total
        self.end = now
        return True

    def take(self, receiver: bool) -> tuple[int, float] | None:
        """(bytes, seconds) of the data since the last take, or None; resets."""
        if self.start is None or self.end is None:
            self.reset()
            return None
        nbytes = self.data_total - self.base
        secs = self.end - self.start
        if receiver:  # the first chunk's transfer time is unseen: extrapolate from the rest
            rest = nbytes - self.first
            secs = secs * nbytes / rest if rest > 0 and secs > 0 else 0.0
        self.reset()
        return nbytes, secs


class CountingRelay:
    """In-process TCP relay that counts (and optionally shapes) the bytes of every connection.

    `start()` listens on `listen_host`, port 0, and returns the (host, port) to connect to. Each
    accepted connection gets its own connection to (target_host, target_port). `counters()` gives
    the bytes client->server ("up") and server->client ("down") summed over all connections: exactly
    what recv() returned from each side (bytes are counted when read, before they are forwarded).

    The relay runs its own asyncio loop in a daemon thread. When one side ends its sending half
    (EOF), the relay forwards the EOF (shutdown(SHUT_WR)) after any data still in flight, and closes
    both sockets once both directions have ended. A connection error on either side closes both.
    `stop()` closes the listener and every connection and joins the thread; it is idempotent.
    """

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 link: LinkProfile | str | None = None, seed: int | None = None) -> None:
        self.target_host = target_host
        self.target_port = int(target_port)
        self.listen_host = listen_host
        self.link = parse_link(link) if link is not None else None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts = [0, 0]  # up, down
        self._connections = 0
        self._state_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lsock: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False
        self._targets: list[tuple] = []
        self._meters = (_Meter(), _Meter())  # up (sender side), down (receiver side)

    # ---- public API ------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Start listening and forwarding; return the local (host, port). Calling it again returns
        the same address."""
        with self._state_lock:
            if self._stopped:
                raise RuntimeError("CountingRelay was stopped; create a new one")
            if self._address is not None:
                return self._address
            self._targets = socket.getaddrinfo(self.target_host, self.target_port, type=socket.SOCK_STREAM)
            if not self._targets:
                raise OSError(f"cannot resolve {self.target_host}:{self.target_port}")
            fam, typ, proto, _, addr = socket.getaddrinfo(
                self.listen_host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            lsock = socket.socket(fam, typ, proto)
            try:
                lsock.bind(addr)
                lsock.listen(1024)
                lsock.setblocking(False)
            except OSError:
                lsock.close()
                raise
            self._lsock = lsock
            self._loop = asyncio.new_event_loop()
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ready,), name="efmuon-relay", daemon=True)
            self._thread.start()
            ready.wait()
            host, port = lsock.getsockname()[:2]
            self._address = (host, port)
            return self._address

    @property
    def address(self) -> tuple[str, int]:
        """The local (host, port) clients connect to (after start())."""
        if self._address is None:
            raise RuntimeError("CountingRelay not started")
        return self._address

    def counters(self) -> dict[str, int]:
        """{"up": bytes client->server, "down": bytes server->client}, over all connections so far."""
        with self._lock:
            return {"up": self._counts[0], "down": self._counts[1]}

    def take_transfers(self, timeout: float = 2.0) -> dict[str, tuple[int, float] | None]:
        """{"up": (bytes, seconds) or None, "down": ...}: the data each direction carried since the
        last call and how long it took (module docstring, transfer timing); resets. Waits up to
        `timeout` for an uplink still draining (its bytes not yet acknowledged by the server)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._meters[0].pending or time.monotonic() >= deadline:
                    return {"up": self._meters[0].take(False), "down": self._meters[1].take(True)}
            time.sleep(_DRAIN_POLL)

    @property
    def connections(self) -> int:
        """Number of client connections accepted so far."""
        with self._lock:
            return self._connections

    def stop(self) -> None:
        """Close the listener and all connections, stop the loop and join the thread. Idempotent."""
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            try:
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
                fut.result(timeout=5)
            except Exception:  # noqa: BLE001 - best effort; the loop is stopped below anyway
                pass
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # loop already closed
                pass
            thread.join(timeout=5)

    def __enter__(self) -> "CountingRelay":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- loop thread -----------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        self._accept_task = loop.create_task(self._accept_loop())
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                for t in asyncio.all_tasks(loop):
                    t.cancel()
                loop.run_until_complete(asyncio.sleep(0))
            finally:
                _close(self._lsock)
                loop.close()

    async def _shutdown(self) -> None:
        self._accept_task.cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(self._accept_task, *tasks, return_exceptions=True)
        _close(self._lsock)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            try:
                client, _ = await loop.sock_accept(self._lsock)
            except asyncio.CancelledError:
                raise
            except OSError:
                # e.g. EMFILE: back off instead of spinning
                await asyncio.sleep(0.05)
                continue
            with self._lock:
                self._connections += 1
            task = loop.create_task(self._handle(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        err: OSError | None = None
        for fam, typ, proto, _, addr in self._targets:
            sock = socket.socket(fam, typ, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, addr)
                return sock
            except OSError as e:
                err = e
                sock.close()
            except BaseException:
                sock.close()
                raise
        raise err or OSError("no address to connect to")

    async def _handle(self, client: socket.socket) -> None:
        server = None
        tasks: list[asyncio.Task] = []
        try:
            client.setblocking(False)
            server = await self._connect()
            for s in (client, server):
                try:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            loop = asyncio.get_running_loop()
            track = _Track()
            tasks = [loop.create_task(self._direction(client, server, 0, track)),
                     loop.create_task(self._direction(server, client, 1, track)),
                     loop.create_task(self._drain_watch(server, track))]
            await asyncio.gather(*tasks[:2])
        except (OSError, EOFError):
            pass  # reset / refused / broken pipe: close both sides below
        finally:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            _close(client)
            _close(server)

    def _direction(self, src: socket.socket, dst: socket.socket, idx: int, track: "_Track"):
        rate, shaped = (self.link.direction("up" if idx == 0 else "down") if self.link is not None
                        else (None, False))
        if not shaped:
            return self._pump_fast(src, dst, idx, track)
        assert self.link is not None
        if not (self.link.delay_s or self.link.jitter_s or self.link.loss):
            return self._pump_rate(src, dst, idx, rate, track)  # type: ignore[arg-type]
        return self._pump_delayed(src, dst, idx, rate, track)

    # ---- transfer timing -------------------------------------------------------------------

    def _on_read(self, idx: int, n: int, track: "_Track") -> None:
        with self._lock:
            self._counts[idx] += n
            if idx == 0:
                track.read += n
                if self._meters[0].on_bytes(n, time.monotonic()):
                    self._meters[0].pending = True
                    track.event.set()

    def _on_sent(self, idx: int, n: int, track: "_Track") -> None:
        if idx == 0:
            track.fwd += n
        else:
            with self._lock:
                self._meters[1].on_bytes(n, time.monotonic())

    async def _drain_watch(self, dst: socket.socket, track: "_Track") -> None:
        """While uplink data is pending: poll until everything read was forwarded and acknowledged
        by the server's TCP; that moment ends the uplink transfer."""
        meter = self._meters[0]
        while True:
            await track.event.wait()
            track.event.clear()
            while True:
                if track.fwd >= track.read and _outq(dst) == 0:
                    with self._lock:
                        if track.fwd >= track.read and meter.pending:
                            meter.end = time.monotonic()
                            meter.pending = False
                    break
                await asyncio.sleep(_DRAIN_POLL)

    # ---- unshaped hot path -----------------------------------------------------------------

    async def _pump_fast(self, src: socket.socket, dst: socket.socket, idx: int, track: "_Track") -> None:
        loop = asyncio.get_running_loop()
        recv_into, sendall = loop.sock_recv_into, loop.sock_sendall
        on_read, on_sent = self._on_read, self._on_sent
        buf = bytearray(_SMALL_BUF)
        view = memoryview(buf)
        size = _SMALL_BUF
        while True:
            n = await recv_into(src, buf)
            if not n:
                break
            on_read(idx, n, track)
            await sendall(dst, view[:n] if n < size else view)
            on_sent(idx, n, track)
            if n == size and size < _BIG_BUF:  # bulk transfer: switch to the big buffer
                size = _BIG_BUF
                buf = bytearray(size)
                view = memoryview(buf)
        _shutdown_write(dst)

    # ---- shaped paths ----------------------------------------------------------------------

    async def _pump_rate(self, src: socket.socket, dst: socket.socket, idx: int, rate: float,
                         track: "_Track") -> None:
        """Rate limit only: read a chunk, pay for it in the bucket, forward it."""
        loop = asyncio.get_running_loop()
        chunk = _chunk_size(rate)
        bucket = _TokenBucket(rate, max(chunk, rate / 8 * 0.010))
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            n = await loop.sock_recv_into(src, buf)
            if not n:
                break
            self._on_read(idx, n, track)
            wait = bucket.charge(n)
            if wait > 0:
                await asyncio.sleep(wait)
            await loop.sock_sendall(dst, view[:n])
            self._on_sent(idx, n, track)
        _shutdown_write(dst)

    async def _pump_delayed(self, src: socket.socket, dst: socket.socket, idx: int, rate: float | None,
                            track: "_Track") -> None:
        """Rate, one-way delay with jitter, and loss-as-RTO. A reader pays the bucket and queues
        (deadline, bytes); a writer forwards each item at its deadline, in order. The queue holds at
        most rate*(delay+jitter) + 256 KiB bytes (at least one chunk)."""
        link = self.link
        assert link is not None
        loop = asyncio.get_running_loop()
        chunk = _chunk_size(rate)
        bucket = _TokenBucket(rate, max(chunk, rate / 8 * 0.010)) if rate else None
        bound_rate = rate if rate else _NOMINAL_FAST_BPS
        limit = min(_MAX_QUEUE, int(bound_rate / 8 * (link.delay_s + link.jitter_s))) + _QUEUE_SLACK
        limit = max(limit, chunk)
        rto = max(_MIN_RTO, 2 * link.delay_s)
        rng = self._rng
        queue: collections.deque = collections.deque()
        state = {"bytes": 0}
        have_data = asyncio.Event()
        have_space = asyncio.Event()

        async def writer() -> None:
            while True:
                while not queue:
                    have_data.clear()
                    await have_data.wait()
                deadline, data = queue[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                queue.popleft()
                if data is None:
                    _shutdown_write(dst)
                    return
                await loop.sock_sendall(dst, data)
                self._on_sent(idx, len(data), track)
                state["bytes"] -= len(data)
                have_space.set()

        async def reader() -> None:
            buf = bytearray(chunk)
            offset = 0          # bytes read so far in this direction (for the per-64 KiB loss draw)
            last = 0.0          # last deadline: keeps the queue in order under jitter
            while True:
                n = await loop.sock_recv_into(src, buf)
                if not n:
                    queue.append((last, None))
                    have_data.set()
                    return
                self._on_read(idx, n, track)
                while state["bytes"] > 0 and state["bytes"] + n > limit:
                    have_space.clear()
                    await have_space.wait()
                if bucket is not None:
                    wait = bucket.charge(n)
                    if wait > 0:
                        await asyncio.sleep(wait)
                d = link.delay_s
                if link.jitter_s:
                    d = max(0.0, d + rng.uniform(-link.jitter_s, link.jitter_s))
                deadline = time.monotonic() + d
                if link.loss:
                    # number of 64 KiB segments that start inside [offset, offset + n)
                    first = -(-offset // _LOSS_SEGMENT) * _LOSS_SEGMENT
                    k = (offset + n - 1 - first) // _LOSS_SEGMENT + 1 if first < offset + n else 0
                    if k and rng.random() < 1.0 - (1.0 - link.loss) ** k:
                        deadline += rto
                offset += n
                last = max(last, deadline)
                queue.append((last, bytes(buf[:n])))
                state["bytes"] += n
                have_data.set()

        # Either half failing (peer reset, broken pipe) ends the direction, and the connection.
        tasks = [loop.create_task(reader()), loop.create_task(writer())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


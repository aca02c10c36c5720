"""Wire-byte counting and in-process link emulation for gRPC connections (docs/design.md §5).

`CountingRelay` is a TCP relay that runs in the caller's process. A gRPC client channel connects to
the relay instead of the server, and the relay forwards every byte to the real target. Bytes are
counted at the socket, so the counts include everything the connection carried: HTTP/2 and gRPC
framing, and TLS records when TLS is on. IP/TCP headers are not included. This gives the "wire"
figure of docs/design.md §5::

    with CountingRelay("127.0.0.1", server_port) as relay:
        host, port = relay.address
        channel = grpc.aio.insecure_channel(f"{host}:{port}")
        ...
        relay.counters()  # {"up": bytes client->server, "down": bytes server->client}

With a `LinkProfile`, the relay also shapes each direction (rate, delay with jitter, loss as a
retransmission delay): `efmuon.worker.shaping` describes the model.

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

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

from ..common.links import LinkProfile, parse_link
from .shaping import pump_delayed, pump_rate
from .transfer import _DRAIN_POLL, _close, _Meter, _outq, _shutdown_write, _Track

_SMALL_BUF = 64 * 1024          # first buffer of an unshaped direction
_BIG_BUF = 1024 * 1024          # grown to this once a recv fills the small buffer


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

        def on_read(n: int) -> None:
            self._on_read(idx, n, track)

        def on_sent(n: int) -> None:
            self._on_sent(idx, n, track)

        if not (self.link.delay_s or self.link.jitter_s or self.link.loss):
            return pump_rate(src, dst, rate, on_read, on_sent)  # type: ignore[arg-type]
        return pump_delayed(src, dst, self.link, rate, self._rng, on_read, on_sent)

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

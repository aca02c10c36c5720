"""Link emulation inside `CountingRelay`: one shaped direction of a connection.

With a `LinkProfile`, the relay shapes each direction. That is emulation level (a) of the
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

A direction with a rate only takes `pump_rate`; one with delay, jitter or loss takes
`pump_delayed` (a `DelayLine`: a reader that pays the bucket and queues, a writer that forwards at
the deadlines). The loss segment and the RTO floor are the link model's (`efmuon.common.links`),
which the federated simulator's clock uses too.
"""
from __future__ import annotations

import asyncio
import collections
import random
import socket
import time
from collections.abc import Callable

from ..common.links import LOSS_SEGMENT, MIN_RTO, LinkProfile
from .transfer import _shutdown_write

_MAX_CHUNK = 1024 * 1024        # largest chunk forwarded at once (the unshaped path's big buffer)
_QUEUE_SLACK = 256 * 1024       # in-flight bound = rate*(delay+jitter) + this
_NOMINAL_FAST_BPS = 10e9        # rate used for the in-flight bound when a delayed direction has no rate
_MAX_QUEUE = 64 * 1024 * 1024   # ... and the bound is capped at this


def _chunk_size(rate_bps: float | None) -> int:
    """Largest chunk forwarded at once: about 10 ms of rate, a power of two in [1 KiB, 1 MiB], so
    <= 16 KiB below ~26 Mbit/s and the rate is smooth over short windows."""
    if not rate_bps:
        return 256 * 1024
    target = rate_bps / 8 * 0.010
    size = 1024
    while size * 2 <= target and size < _MAX_CHUNK:
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



async def pump_rate(src: socket.socket, dst: socket.socket, rate: float, on_read: Callable[[int], None],
                    on_sent: Callable[[int], None]) -> None:
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
        on_read(n)
        wait = bucket.charge(n)
        if wait > 0:
            await asyncio.sleep(wait)
        await loop.sock_sendall(dst, view[:n])
        on_sent(n)
    _shutdown_write(dst)


async def pump_delayed(src: socket.socket, dst: socket.socket, link: LinkProfile, rate: float | None,
                       rng: random.Random, on_read: Callable[[int], None], on_sent: Callable[[int], None]) -> None:
    """Rate, one-way delay with jitter, and loss-as-RTO (a `DelayLine`, set up when the pump starts)."""
    await DelayLine(link, rate, rng, on_read, on_sent).run(src, dst)


class DelayLine:
    """One direction with delay: a reader pays the bucket and queues (deadline, bytes); a writer
    forwards each item at its deadline, in order. The queue holds at most rate*(delay+jitter) +
    256 KiB bytes (at least one chunk)."""

    def __init__(self, link: LinkProfile, rate: float | None, rng: random.Random,
                 on_read: Callable[[int], None], on_sent: Callable[[int], None]) -> None:
        self.link, self.rng = link, rng
        self.on_read, self.on_sent = on_read, on_sent
        self.chunk = chunk = _chunk_size(rate)
        self.bucket = _TokenBucket(rate, max(chunk, rate / 8 * 0.010)) if rate else None
        bound_rate = rate if rate else _NOMINAL_FAST_BPS
        limit = min(_MAX_QUEUE, int(bound_rate / 8 * (link.delay_s + link.jitter_s))) + _QUEUE_SLACK
        self.limit = max(limit, chunk)
        self.rto = max(MIN_RTO, 2 * link.delay_s)
        self.queue: collections.deque = collections.deque()
        self.queued = 0  # bytes in the queue
        self.have_data = asyncio.Event()
        self.have_space = asyncio.Event()

    async def run(self, src: socket.socket, dst: socket.socket) -> None:
        """Forward src -> dst until EOF (then dst's sending half is shut down)."""
        loop = asyncio.get_running_loop()
        # Either half failing (peer reset, broken pipe) ends the direction, and the connection.
        tasks = [loop.create_task(self._reader(loop, src)), loop.create_task(self._writer(loop, dst))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _writer(self, loop: asyncio.AbstractEventLoop, dst: socket.socket) -> None:
        queue = self.queue
        while True:
            while not queue:
                self.have_data.clear()
                await self.have_data.wait()
            deadline, data = queue[0]
            wait = deadline - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            queue.popleft()
            if data is None:
                _shutdown_write(dst)
                return
            await loop.sock_sendall(dst, data)
            self.on_sent(len(data))
            self.queued -= len(data)
            self.have_space.set()

    async def _reader(self, loop: asyncio.AbstractEventLoop, src: socket.socket) -> None:
        buf = bytearray(self.chunk)
        offset = 0          # bytes read so far in this direction (for the per-64 KiB loss draw)
        last = 0.0          # last deadline: keeps the queue in order under jitter
        while True:
            n = await loop.sock_recv_into(src, buf)
            if not n:
                self.queue.append((last, None))
                self.have_data.set()
                return
            self.on_read(n)
            while self.queued > 0 and self.queued + n > self.limit:
                self.have_space.clear()
                await self.have_space.wait()
            if self.bucket is not None:
                wait = self.bucket.charge(n)
                if wait > 0:
                    await asyncio.sleep(wait)
            last = max(last, self._deadline(offset, n))
            offset += n
            self.queue.append((last, bytes(buf[:n])))
            self.queued += n
            self.have_data.set()

    def _deadline(self, offset: int, n: int) -> float:
        """When the n bytes at `offset` of this direction, through the bucket now, are due: now +
        delay + uniform(-jitter, jitter) (>= now), plus an RTO when a 64 KiB segment that starts
        inside them is lost."""
        link, rng = self.link, self.rng
        d = link.delay_s
        if link.jitter_s:
            d = max(0.0, d + rng.uniform(-link.jitter_s, link.jitter_s))
        deadline = time.monotonic() + d
        if link.loss:
            # number of 64 KiB segments that start inside [offset, offset + n)
            first = -(-offset // LOSS_SEGMENT) * LOSS_SEGMENT
            k = (offset + n - 1 - first) // LOSS_SEGMENT + 1 if first < offset + n else 0
            if k and rng.random() < 1.0 - (1.0 - link.loss) ** k:
                deadline += self.rto
        return deadline

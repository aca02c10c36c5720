"""The socket-level pieces of `CountingRelay`: ending a socket's sending half and closing it, the
kernel send queue (SIOCOUTQ, for when an uplink has been acknowledged), and the meters that time
each direction's data transfers (`CountingRelay.take_transfers`, described in `efmuon.worker.relay`)."""
from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios


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


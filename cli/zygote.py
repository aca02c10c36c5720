"""`python -m efmuon.cli.zygote FD`: loads torch once and forks `efmuon run`'s local workers from it.

A worker process spends most of its start-up loading torch (seconds of CPU on a small machine, and
its own copy of torch's pages). `efmuon run` starts this process first, while it builds its own
model; each local worker is then a `fork()` of it that runs `efmuon worker ARGS` with torch already
loaded, its pages shared copy-on-write. The zygote itself never computes and never opens a gRPC
channel (gRPC is loaded by each worker after the fork), so nothing that a fork would break runs in
it: it is single-threaded but for the thread pool numpy's BLAS starts at import, which is fork-aware.

Control, on the Unix socket FD (one JSON object per line):
  in   {"j": J, "argv": [worker flags]}                          fork worker J (the zygote's environment)
  out  {"j": J, "pid": PID}                                      it started
  out  {"j": J, "code": CODE}                                    it exited (-N: killed by signal N)
When the socket closes (the run ended, or died), the zygote sends SIGTERM to the workers still
running, waits up to `DRAIN_S` for them, kills the rest and exits. It gets SIGTERM itself when
`efmuon run` dies (server.spawn.die_with_parent), and each worker gets SIGTERM when the zygote dies
(PR_SET_PDEATHSIG), so no worker outlives a killed run. Linux only (server.local uses exec elsewhere).
"""
from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback

import torch  # noqa: F401 - the preload: what every worker imports first, and the bulk of its start-up

from ..common import model  # noqa: F401 - the preload: the tasks and their models
from . import main as efmuon_main

DRAIN_S = 10.0
PR_SET_PDEATHSIG = 1


CLONE_NEWNET = 0x40000000


def _enter_netns(name: str) -> None:
    """Move this (single-threaded, just forked) process into network namespace `name` (/run/netns/NAME), as
    `ip netns exec` does for the network: every socket it opens from now on lives there."""
    fd = os.open(os.path.join("/run/netns", name), os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name} failed")
    finally:
        os.close(fd)


def _child(argv: list[str], zygote_pid: int, close: list, netns: str | None = None) -> None:
    """In the forked worker: never returns (os._exit with the worker's exit code)."""
    code = 1
    try:
        if netns:
            _enter_netns(netns)
        for c in close:
            try:
                c.close() if hasattr(c, "close") else os.close(c)
            except OSError:
                pass
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: the worker's own handling
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != zygote_pid:  # the zygote died before the signal was set
            os._exit(128 + signal.SIGTERM)
        sys.argv = ["efmuon worker", *argv]
        code = efmuon_main(["worker", *argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the worker's failure is printed, its exit code says it
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream: nothing more to say
                pass
        os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


class Zygote:
    """The zygote's loop: requests from the control socket, exits reaped on SIGCHLD."""

    def __init__(self, ctrl: socket.socket):
        self.ctrl = ctrl
        self.pid = os.getpid()
        self.running: dict[int, int] = {}  # pid: j
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() through the wake-up fd
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the run and its workers

    def send(self, message: dict) -> None:
        try:
            self.ctrl.sendall((json.dumps(message) + "\n").encode())
        except OSError:
            pass  # the run is gone: the EOF ends the loop

    def spawn(self, request: dict) -> None:
        j, argv = int(request["j"]), [str(a) for a in request["argv"]]
        netns = request.get("netns")
        pid = os.fork()
        if pid == 0:
            _child(argv, self.pid, [self.ctrl, self._wake_r, self._wake_w], str(netns) if netns else None)
        self.running[pid] = j
        self.send({"j": j, "pid": pid})

    def reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            j = self.running.pop(pid, None)
            if j is not None:
                self.send({"j": j, "code": os.waitstatus_to_exitcode(status)})

    def loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.ctrl, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        buf = b""
        while True:
            for key, _ in sel.select():
                if key.fileobj is self.ctrl:
                    data = self.ctrl.recv(1 << 16)
                    if not data:
                        return self.drain()
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        self.spawn(json.loads(line))
                else:
                    os.read(self._wake_r, 4096)
            self.reap()

    def drain(self) -> None:
        """The run closed the socket: stop what still runs, then exit."""
        for pid in list(self.running):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + DRAIN_S
        while self.running and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in list(self.running):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main(argv: list[str]) -> int:
    Zygote(socket.socket(fileno=int(argv[0]))).loop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

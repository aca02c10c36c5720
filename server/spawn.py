"""How `efmuon run` starts its local worker processes.

`ForkServer` (Linux): one zygote process (`efmuon.cli.zygote`) loads torch while the run builds its
own model, and each worker is a fork of it, so n local workers load torch once instead of n times
(seconds of CPU each on a small machine) and share its pages. Under `--shaping netns` each forked
worker enters its client's network namespace (setns) before it opens a socket. Elsewhere (or with
EFMUON_WORKER_SPAWN=exec) every worker is its own `python -m efmuon.worker` process, inside a
namespace by `ip netns exec`. Both hand back objects with the `asyncio.subprocess.Process`
calls `server.local` uses: `wait()`, `returncode`, `terminate()`, `kill()`, `pid`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys

from ..common.errors import ConfigError

log = logging.getLogger("efmuon.server")

# Run by a child's own interpreter before it execs its command (argv: the parent's pid, then the
# command): SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG = 1, kept across exec), and at once
# when it already died.
DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                   "os.getppid() == int(sys.argv[1]) or os.kill(os.getpid(), signal.SIGTERM); "
                   "os.execv(sys.argv[2], sys.argv[2:])")


def die_with_parent(cmd: list[str]) -> list[str]:
    """`cmd` (an absolute executable first) such that it gets SIGTERM when this process dies, also by
    SIGKILL, so the local workers of a killed `efmuon run` do not live on as orphans re-joining for
    minutes (Linux; elsewhere `cmd` as it is: the workers then end by their --reconnect-timeout).

    A small interpreter sets the signal and execs `cmd` (no `preexec_fn`: forking this process, whose
    gRPC threads run, is unsafe). The signal comes when the thread that started the child ends:
    `run_local` starts them from its own thread, which outlives the workers."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *cmd]


SPAWN_ENV = "EFMUON_WORKER_SPAWN"  # fork (default on Linux) or exec: how `efmuon run` starts its workers


def spawn_mode() -> str:
    """'fork' (from the zygote) or 'exec' (each worker its own interpreter): $EFMUON_WORKER_SPAWN, by
    default fork on Linux and exec elsewhere. exec is the way out should a platform's torch not
    survive a fork, and the baseline of the start-up figures in BENCHMARKS.md."""
    mode = os.environ.get(SPAWN_ENV, "").strip().lower() or ("fork" if sys.platform.startswith("linux") else "exec")
    if mode not in ("fork", "exec"):
        raise ConfigError(f"{SPAWN_ENV}={os.environ[SPAWN_ENV]!r} is not a way to start workers: give fork or exec")
    if mode == "fork" and not sys.platform.startswith("linux"):
        raise ConfigError(f"{SPAWN_ENV}=fork needs Linux (PR_SET_PDEATHSIG); use exec here")
    return mode


class ForkedWorker:
    """A worker forked by the zygote: its pid, and its exit code once the zygote reported it."""

    def __init__(self, j: int):
        self.j = j
        self.pid: int | None = None
        self.returncode: int | None = None
        self._started = asyncio.get_running_loop().create_future()
        self._exited = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def _signal(self, sig: int) -> None:
        if self.pid is not None and self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _exit(self, code: int) -> None:
        self.returncode = code
        if not self._exited.done():
            self._exited.set_result(code)


class ForkServer:
    """The zygote process and its control socket: made before the model is built (the zygote
    loads torch meanwhile); `await fork(j, args)` once the server listens; `close()` at the end."""

    def __init__(self, env: dict[str, str]):
        self._sock, theirs = socket.socketpair()
        cmd = die_with_parent([sys.executable, "-m", "efmuon.cli.zygote", str(theirs.fileno())])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self._workers: dict[int, ForkedWorker] = {}
        self._reader: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def fork(self, j: int, args: list[str], netns: str | None = None) -> ForkedWorker:
        """Worker j, running `efmuon worker ARGS` in the zygote's environment (inside network namespace
        `netns` when given: the child enters it before it opens any socket); returns once it is forked."""
        if self._writer is None:
            reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
            self._reader = asyncio.ensure_future(self._read(reader))
        w = self._workers[j] = ForkedWorker(j)
        self._writer.write((json.dumps({"j": j, "argv": args, **({"netns": netns} if netns else {})}) + "\n").encode())
        await self._writer.drain()
        await asyncio.wait([w._started, self._reader], return_when=asyncio.FIRST_COMPLETED)
        if not w._started.done():
            raise RuntimeError(f"the worker zygote (pid {self.proc.pid}) ended before it started worker {j}")
        return w

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            msg = json.loads(line)
            w = self._workers.get(msg["j"])
            if w is None:
                continue
            if "pid" in msg:
                w.pid = msg["pid"]
                w._started.set_result(None)
            elif "code" in msg:
                w._exit(msg["code"])
        for w in self._workers.values():  # the zygote is gone, and its workers with it
            w._exit(w.returncode if w.returncode is not None else -signal.SIGTERM)

    async def aclose(self) -> None:
        """Close the control socket from the event loop that opened it: the zygote stops what still runs
        and exits."""
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
            self._writer = None
        if self._reader is not None:
            self._reader.cancel()

    def close(self, timeout: float = 15.0) -> None:
        """Close the control socket (if `aclose` did not) and reap the zygote."""
        self._sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

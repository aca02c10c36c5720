"""Process plumbing of the service benchmarks: starting a helper process of
`python -m efmuon.benchmarks.service MODE JSON`, reading its JSON lines, and its memory and CPU
figures from /proc."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ENTRY = "efmuon.benchmarks.service"  # the helper processes' entry point (service.MODES)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (a gloo rendezvous, a helper's server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM / VmRSS in bytes from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(mode: str, spec: dict, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """A helper subprocess; it prints one JSON line when ready (and one when done). With
    stdin=subprocess.PIPE it runs until its stdin is closed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", ENTRY, mode, json.dumps(spec)],
                            stdout=subprocess.PIPE, stdin=stdin, env=env, text=True)


def read_json(proc: subprocess.Popen, timeout: float = 600.0) -> dict:
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout)
        raise RuntimeError(f"bench helper exited with code {proc.returncode} before reporting")
    return json.loads(line)


def kill_leftovers(procs) -> None:
    """Kill the helpers of `procs` that are still running (after an error)."""
    for p in procs:
        if p.poll() is None:
            p.kill()

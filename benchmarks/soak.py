"""`efmuon bench soak`: a long run of real processes, watching the server's memory.

16 `efmuon worker` processes and one `efmuon server` (checkpointing every 50 rounds) train lsq for
500 rounds on 127.0.0.1. The server's resident set size (Status.rss_bytes) is sampled throughout;
the goal is that it grows by less than 10% between warm-up (round 50) and the end. `--quick`:
4 workers, 60 rounds (a smoke test); the smoke level (`run_bench(..., smoke=True)`): 1 worker,
4 rounds. Not a CI test.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import grpc

from ..common.wire import protocol
from ..v1 import service_pb2 as pb
from ..v1 import service_pb2_grpc as pb_grpc
from .harness import bench, by_level, goal, table

CLI = [sys.executable, "-m", "efmuon.cli"]


def _status(port: int):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=protocol.CHANNEL_OPTIONS)
    stub = pb_grpc.ParameterServerStub(channel)

    def call():
        try:
            return stub.Status(pb.StatusRequest(), timeout=5)
        except grpc.RpcError:
            return None
    return call, channel


def soak(workers: int, rounds: int, warmup: int, task: str = "lsq", every: float = 0.25) -> dict:
    tmp = tempfile.mkdtemp(prefix="efmuon-soak-")
    log_path = os.path.join(tmp, "server.log")
    flags = ["--task", task, "--workers", str(workers), "--rounds", str(rounds), "--uplink", "topk:0.1",
             "--downlink", "topk:0.1", "--eval-every", "10", "--log-every", str(max(1, rounds // 10))]
    with open(log_path, "w") as log:
        server = subprocess.Popen(CLI + ["server", "--host", "127.0.0.1", "--port", "0", *flags,
                                         "--checkpoint-dir", os.path.join(tmp, "ckpt"), "--checkpoint-every", "50",
                                         "--report", os.path.join(tmp, "report.json"), "--plots", "none"],
                                  stdout=log, stderr=subprocess.STDOUT)
    procs = []
    samples = []  # (seconds, round, rss bytes)
    try:
        deadline = time.monotonic() + 120
        port = None
        while port is None:
            m = re.search(r"listening on [0-9.]+:(\d+)", open(log_path).read())
            if m:
                port = int(m.group(1))
            elif server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {open(log_path).read()[-2000:]}")
            time.sleep(0.1)
        procs = [subprocess.Popen(CLI + ["worker", "--server", f"127.0.0.1:{port}", "--client-id", str(j), "--quiet"],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"worker{j}.log"), "w"))
                 for j in range(workers)]
        status, channel = _status(port)
        t0 = time.monotonic()
        while server.poll() is None:
            st = status()
            if st is not None and st.rss_bytes:
                samples.append((time.monotonic() - t0, int(st.round), int(st.rss_bytes)))
            time.sleep(every)
        channel.close()
        codes = [p.wait(timeout=120) for p in procs]
        seconds = time.monotonic() - t0
    finally:
        for p in [server, *procs]:
            if p.poll() is None:
                p.kill()
    report = json.load(open(os.path.join(tmp, "report.json")))
    running = [s for s in samples if 1 <= s[1] <= rounds]
    warm = [s for s in running if s[1] >= warmup]
    rss_warm = warm[0][2] if warm else None
    rss_end = running[-1][2] if running else None
    rss_max = max((s[2] for s in running), default=None)
    growth = (rss_end / rss_warm - 1.0) if rss_warm and rss_end else None
    return {"workers": workers, "rounds": rounds, "task": task, "server_exit": server.returncode,
            "worker_exits_nonzero": sum(1 for c in codes if c != 0), "seconds": seconds,
            "rounds_per_s": rounds / seconds if seconds else None, "warmup_round": warmup,
            "rss_warm_MB": rss_warm and rss_warm / 1e6, "rss_end_MB": rss_end and rss_end / 1e6,
            "rss_max_MB": rss_max and rss_max / 1e6, "growth_pct": None if growth is None else 100 * growth,
            "final_loss_w": report["summary"].get("final_loss_w"), "samples": len(samples),
            "rss_trace": [(round(t, 2), r, m) for t, r, m in samples[:: max(1, len(samples) // 50)]], "dir": tmp}


@bench("soak")
def bench_soak(level: str) -> dict:
    """Soak: 16 worker processes x 500 rounds (lsq), the server's RSS after warm-up vs at the end."""
    workers, rounds, warmup = by_level(level, full=(16, 500, 50), quick=(4, 60, 10), smoke=(1, 4, 1))
    r = soak(workers, rounds, warmup)
    ok = r["server_exit"] == 0 and r["worker_exits_nonzero"] == 0
    goals = [goal("run completed (server and every worker exit 0)", ok, "true", ok),
             goal(f"server RSS growth from round {warmup} to the end", r["growth_pct"] and round(r["growth_pct"], 2),
                  "< 10%", r["growth_pct"] is not None and r["growth_pct"] < 10)]
    cols = ["workers", "rounds", "seconds", "rounds_per_s", "rss_warm_MB", "rss_end_MB", "rss_max_MB", "growth_pct",
            "final_loss_w"]
    return {"result": r, "goals": goals, "table": table([r], cols)}

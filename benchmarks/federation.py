"""`efmuon bench federation`: a federation over real sockets on this machine, the acceptance size of the
networked cohorts (docs/design.md §6): 100 digits clients hosted several per worker process, 5% of them per
round, per-client links drawn from `dsl=0.3,lte=0.5,wifi=0.2` and shaped by each client's relay, 20 rounds.

Each repeat runs `efmuon run` (server, worker processes, gRPC over 127.0.0.1) and, as the baseline measured
in the same run, `efmuon simulate` with the same flags (the same federation in one process, no transport;
its clock is simulated). It reports the wall time of both, the server's peak RSS, the worker processes,
the links' achieved rates against their configured ones, and whether both ended in the same bits."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .harness import bench, by_level, goal, table

CLI = [sys.executable, "-m", "efmuon.cli"]
MIX = "dsl=0.3,lte=0.5,wifi=0.2"


def flags(clients: int, rounds: int) -> list[str]:
    return ["--task", "digits", "--clients", str(clients), "--participation", "0.05", "--link-mix", MIX,
            "--rounds", str(rounds), "--seed", "0", "--plots", "none"]


def one(command: str, args: list[str], report: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = subprocess.run(CLI + [command, *args, "--report", report], capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"efmuon {command} failed: {out.stdout[-1500:]} {out.stderr[-2500:]}")
    with open(report) as fh:
        return wall, json.load(fh)


def achieved_share(links: dict, direction: str) -> float | None:
    """Median over the clients of achieved / configured rate in one direction (shaped links with a rate)."""
    shares = [s[direction]["achieved_bps"] / s[direction]["configured_bps"] for s in links.values()
              if s[direction].get("achieved_bps") and s[direction].get("configured_bps")]
    return statistics.median(shares) if shares else None


@bench("federation")
def bench_federation(level: str) -> dict:
    """100 clients over real sockets, 5% per round, a link mix: wall time and server RSS, against simulate."""
    clients, rounds, repeat = by_level(level, full=(100, 20, 2), quick=(40, 10, 1), smoke=(8, 2, 1))
    args = flags(clients, rounds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="efmuon-bench-federation-") as tmp:
        for r in range(repeat):
            sim_s, sim = one("simulate", args, os.path.join(tmp, f"sim{r}.json"))
            net_s, net = one("run", args, os.path.join(tmp, f"net{r}.json"))
            s = net["summary"]
            rows.append({"clients": clients, "rounds": rounds, "per_round": s["federated"]["per_round"],
                         "processes": len(s.get("worker_processes") or []) or None,
                         "run_s": net_s, "simulate_s": sim_s, "x_simulate": net_s / sim_s if sim_s else None,
                         "server_peak_MB": s["server_peak_rss_bytes"] / 2**20,
                         "catchup_MB": s["federated"]["catchup_bytes"] / 2**20,
                         "up_achieved/configured": achieved_share(s.get("links") or {}, "up"),
                         "down_achieved/configured": achieved_share(s.get("links") or {}, "down"),
                         "same_bits": s["w_sha256"] == sim["summary"]["w_sha256"]})
    med = {k: statistics.median(r[k] for r in rows) for k in ("run_s", "simulate_s", "server_peak_MB")}
    goals = [goal(f"{clients} clients over real sockets end in simulate's bits", all(r["same_bits"] for r in rows),
                  "True", all(r["same_bits"] for r in rows)),
             goal(f"wall time of {rounds} rounds with {clients} clients (median s)", round(med["run_s"], 1),
                  "< 300", med["run_s"] < 300),
             goal("the server's peak RSS (median MB)", round(med["server_peak_MB"], 1), "< 1024",
                  med["server_peak_MB"] < 1024)]
    cols = ["clients", "rounds", "per_round", "processes", "run_s", "simulate_s", "x_simulate", "server_peak_MB",
            "catchup_MB", "up_achieved/configured", "down_achieved/configured", "same_bits"]
    return {"result": {"rows": rows, **med}, "goals": goals, "table": table(rows, cols)}

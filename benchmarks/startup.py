"""`efmuon bench startup`: what `efmuon run` spends to start its workers, forked from the zygote that
loaded torch once (the default on Linux) vs each exec'd as its own interpreter (EFMUON_WORKER_SPAWN=exec,
the baseline, measured in the same run, the two kinds alternating).

Each repeat is one `efmuon run --task lsq --workers N --rounds 1`: its wall time, and the CPU seconds of
the run and every process below it (getrusage of the reaped children: the zygote reaps its workers and
the run reaps the zygote, so both kinds count all their processes)."""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from .harness import bench, by_level, goal, table

CLI = [sys.executable, "-m", "efmuon.cli"]


def one_run(workers: int, mode: str, directory: str) -> dict:
    """Wall and CPU seconds of one `efmuon run` with `workers` local workers started by `mode`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(CLI + ["run", "--task", "lsq", "--workers", str(workers), "--rounds", "1", "--plots", "none",
                                "--report", os.path.join(directory, f"{mode}.json")],
                         capture_output=True, text=True, env={**os.environ, "EFMUON_WORKER_SPAWN": mode}, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"efmuon run ({mode}) failed: {out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


@bench("startup")
def bench_startup(level: str) -> dict:
    """Start-up of `efmuon run`'s local workers: forked from the zygote vs exec'd (the baseline)."""
    workers, repeat = by_level(level, full=(8, 3), quick=(4, 2), smoke=(2, 1))
    runs: dict[str, list[dict]] = {"exec": [], "fork": []}
    with tempfile.TemporaryDirectory(prefix="efmuon-bench-startup-") as tmp:
        for _ in range(repeat):
            for mode in ("exec", "fork"):  # alternating: a noisy machine hits both alike
                runs[mode].append(one_run(workers, mode, tmp))
    rows = []
    for mode, rs in runs.items():
        rows.append({"spawn": mode, "workers": workers, "repeats": len(rs),
                     "wall_s": statistics.median(r["wall_s"] for r in rs),
                     "cpu_s": statistics.median(r["cpu_s"] for r in rs)})
    exec_row, fork_row = rows
    cpu_ratio = exec_row["cpu_s"] / fork_row["cpu_s"] if fork_row["cpu_s"] else None
    wall_ratio = exec_row["wall_s"] / fork_row["wall_s"] if fork_row["wall_s"] else None
    for r in rows:
        r["cpu_vs_exec"] = r["cpu_s"] / exec_row["cpu_s"] if exec_row["cpu_s"] else None
        r["wall_vs_exec"] = r["wall_s"] / exec_row["wall_s"] if exec_row["wall_s"] else None
    goals = [goal(f"CPU of a {workers}-worker run with exec'd workers / with forked ones",
                  cpu_ratio and round(cpu_ratio, 2), ">= 2", cpu_ratio is not None and cpu_ratio >= 2),
             goal(f"wall time of a {workers}-worker run with exec'd workers / with forked ones",
                  wall_ratio and round(wall_ratio, 2), ">= 1.3", wall_ratio is not None and wall_ratio >= 1.3)]
    cols = ["spawn", "workers", "repeats", "wall_s", "cpu_s", "wall_vs_exec", "cpu_vs_exec"]
    return {"result": {"rows": rows, "cpu_ratio": cpu_ratio, "wall_ratio": wall_ratio}, "goals": goals,
            "table": table(rows, cols)}

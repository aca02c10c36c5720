"""`efmuon bench bytes-wire`: payload vs wire bytes both ways of a real networked run
(`efmuon.server.local.run_local`: the server in this process, real worker processes on 127.0.0.1)."""
from __future__ import annotations

import time

from ..common.config import DEFAULT_DOWNLINK, DEFAULT_UPLINK, RunConfig
from ..server.local import run_local
from .harness import bench, by_level, goal, table


def _best_pairing() -> tuple[str, str]:
    """The project's default pairing, which `efmuon bench bytes` names as the best (BENCHMARKS.md)."""

    return DEFAULT_UPLINK, DEFAULT_DOWNLINK


@bench("bytes-wire")
def bench_bytes_wire(level: str) -> dict:
    """Payload vs wire bytes both ways through run_local (real server + worker processes)."""

    up, down = _best_pairing()
    task, rounds, workers = by_level(level, full=("gpt-char", 30, 4), quick=("lsq", 20, 2), smoke=("lsq", 3, 1))
    rows = []
    for uplink, downlink in [("identity", "identity"), (up, down)]:
        cfg = RunConfig(task=task, workers=workers, rounds=rounds, uplink=uplink, downlink=downlink)
        t0 = time.perf_counter()
        rep = run_local(cfg, quiet=True)
        s = rep["summary"]
        row = {"task": task, "uplink": uplink, "downlink": downlink, "rounds": rounds, "workers": cfg.workers}
        for d in ("up", "down"):
            tot = {lvl: s["bytes"][d].get(lvl) or 0  # summary.bytes includes the join phase (init_bytes)
                   for lvl in ("payload", "message", "wire")}
            row[f"{d}_payload_MB"] = tot["payload"] / 1e6
            row[f"{d}_message_MB"] = tot["message"] / 1e6
            row[f"{d}_wire_MB"] = tot["wire"] / 1e6
            row[f"{d}_wire/payload"] = tot["wire"] / tot["payload"] if tot["payload"] else None
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {uplink}/{downlink}: up wire/payload {row['up_wire/payload']:.4f}  "
              f"down {row['down_wire/payload']:.4f}  ({row['seconds']:.0f} s)", flush=True)
    goals = [goal(f"{r['uplink']}/{r['downlink']} wire/payload (worst direction, incl. the join phase)",
                  round(max(r["up_wire/payload"], r["down_wire/payload"]), 4), "<= 1.01",
                  max(r["up_wire/payload"], r["down_wire/payload"]) <= 1.01)
             for r in rows]
    cols = ["task", "workers", "rounds", "uplink", "downlink", "up_payload_MB", "up_message_MB", "up_wire_MB",
            "up_wire/payload", "down_payload_MB", "down_message_MB", "down_wire_MB", "down_wire/payload"]
    notes = (f"`efmuon.server.local.run_local`: the server in this process and real worker processes on 127.0.0.1; "
             f"totals over all clients, rounds and the join phase (initial W down, init gradients up). wire = "
             f"bytes each worker's TCP connection carried (its CountingRelay), incl. Status/Join/Leave calls, "
             f"HTTP/2 and gRPC framing. The compressed pairing is the project default "
             f"({up} / {down}), the best of the `bytes` section.")
    return {"result": rows, "goals": goals, "table": notes + "\n\n" + table(rows, cols)}

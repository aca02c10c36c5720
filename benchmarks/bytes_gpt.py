"""`efmuon bench bytes-10m`: the bytes headline on the >= 10M-parameter byte-level GPT (issue 13, item 4).

4 simulated workers (`simulate`: the same EF21-Muon arithmetic as a networked run, which
`bytes-wire` shows costs <= 1.01x the payload on the wire), the `gpt` task at size 10m. Each pairing
(uplink / downlink, with per-layer overrides) runs its own full schedule; identity both ways runs
first and sets the target, its validation loss at half its rounds. Reported per pairing: rounds to
the target, payload MB per worker up / down / total to it, the saving vs identity, and bits per
parameter per round per direction (payload bits of one round / parameters / workers).

The pairings run two at a time in child processes (one torch thread each, so every run keeps the
bit-reproducible single-thread arithmetic), since a run is one core's work.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import torch

from ..common.config import DEFAULT_DOWNLINK, DEFAULT_UPLINK, RunConfig
from ..simulate import simulate
from .algorithm import _rounds_to
from .harness import bench, by_level, goal, table

# the hidden matrices of the gpt task's blocks (attention and MLP); embeddings and wpe keep the default
HIDDEN = "blocks.*.weight"

# (label, uplink, downlink, uplink per-layer, downlink per-layer); identity first (it sets the target)
PAIRINGS = [
    ("identity", "identity", "identity", {}, {}),
    ("default", DEFAULT_UPLINK, DEFAULT_DOWNLINK, {}, {}),
    ("sign both ways", "sign:256", "sign:256", {}, {}),
    ("rank-16 hidden up, sign elsewhere", "sign:256", DEFAULT_DOWNLINK, {HIDDEN: "rankk:16+bf16"}, {}),
]

WORKERS = 4


def _run_one(args: tuple) -> dict:
    """One pairing's simulate run in a child process; returns the per-round bytes and losses."""
    label, options, rounds, every, up, down, up_layers, down_layers = args
    torch.set_num_threads(1)
    cfg = RunConfig(task="gpt", task_options=dict(options), workers=WORKERS, rounds=rounds, uplink=up,
                    downlink=down, uplink_layers=dict(up_layers), downlink_layers=dict(down_layers),
                    eval_every=every, threads=1)
    t0 = time.perf_counter()
    rep = simulate(cfg, quiet=True)
    seconds = time.perf_counter() - t0
    print(f"  {label:40s} up {up:12s} down {down:10s} {up_layers or ''} final val "
          f"{rep['summary']['eval_loss_w']:.4f} ({seconds:.0f} s)", flush=True)
    keep = {"rounds": [{k: r.get(k) for k in ("round", "bytes", "val_loss_w")} for r in rep["rounds"]],
            "summary": {k: rep["summary"].get(k)
                        for k in ("init_bytes", "eval_loss_w", "final_loss_x", "w_sha256", "parameters")}}
    return {"label": label, "uplink": up, "downlink": down, "uplink_layers": up_layers,
            "downlink_layers": down_layers, "report": keep, "seconds": seconds}


def _init_bytes(report: dict) -> int:
    init = report["summary"].get("init_bytes") or {}
    return sum((init.get(d) or {}).get("payload") or 0 for d in ("up", "down"))


@bench("bytes-10m")
def bench_bytes_10m(level: str) -> dict:
    """Bytes to a fixed validation loss on the 10.8M-parameter GPT, per pairing, vs identity both ways."""
    rounds, every, pairings, options = by_level(
        level,
        full=(160, 10, PAIRINGS, {"size": "10m", "context": 128, "batch_size": 4}),
        quick=(40, 5, PAIRINGS[:3], {"size": "10m", "context": 64, "batch_size": 2}),
        smoke=(4, 2, PAIRINGS[:2], {"size": "small", "context": 32, "batch_size": 2}))
    jobs = [(label, tuple(options.items()), rounds, every, up, down, upl, downl)
            for label, up, down, upl, downl in pairings]
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        runs = pool.map(_run_one, jobs, chunksize=1)
    base = runs[0]["report"]
    n_params = base["summary"]["parameters"]
    evaluated = [r for r in base["rounds"] if r.get("val_loss_w") is not None]
    at = min(len(evaluated) - 1, max(0, len(evaluated) // 2 - 1))
    target = evaluated[at]["val_loss_w"]
    _, up0, down0 = _rounds_to(base, target)
    init0 = _init_bytes(base)
    rows = []
    for run in runs:
        rep = run["report"]
        rnd, up, down = _rounds_to(rep, target)
        steady = rep["rounds"][-1]["bytes"]  # one round's payload, all workers (the steady state)
        bpp = {d: 8 * steady[d]["payload"] / WORKERS / n_params for d in ("up", "down")}
        layers = "; ".join(f"{k}={v}" for k, v in run["uplink_layers"].items())
        rows.append({
            "pairing": run["label"], "uplink": run["uplink"] + (f" ({layers})" if layers else ""),
            "downlink": run["downlink"], "rounds_to_target": rnd,
            "up_MB_per_worker": up / WORKERS / 1e6 if rnd else None,
            "down_MB_per_worker": down / WORKERS / 1e6 if rnd else None,
            "total_MB_per_worker": (up + down) / WORKERS / 1e6 if rnd else None,
            "saving_up_x": up0 / up if rnd else None,
            "saving_down_x": down0 / down if rnd else None,
            "saving_total_x": (up0 + down0) / (up + down) if rnd else None,
            "saving_rounds_only_x": (up0 + down0 - init0) / (up + down - _init_bytes(rep)) if rnd else None,
            "bits_per_param_up": bpp["up"], "bits_per_param_down": bpp["down"],
            "final_val_loss_w": rep["summary"]["eval_loss_w"], "seconds": run["seconds"],
        })
    reached = [r for r in rows[1:] if r["saving_total_x"]]
    best = max(reached, key=lambda r: r["saving_total_x"]) if reached else None
    goals = [goal(f"best total saving vs identity at the same validation loss, {n_params / 1e6:.1f}M parameters "
                  "(payload, both directions)", best and round(best["saving_total_x"], 2), ">= 25x",
                  bool(best and best["saving_total_x"] >= 25))]
    cols = ["pairing", "uplink", "downlink", "rounds_to_target", "up_MB_per_worker", "down_MB_per_worker",
            "total_MB_per_worker", "saving_up_x", "saving_down_x", "saving_total_x", "saving_rounds_only_x", "bits_per_param_up",
            "bits_per_param_down", "final_val_loss_w"]
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    notes = (f"`simulate`, task gpt ({opts}: {n_params / 1e6:.2f}M parameters), {WORKERS} workers, {rounds} rounds "
             f"each (cosine, the task's lr 0.05 / beta 0.15), evaluated every {every}. Target: identity's validation "
             f"loss at round {evaluated[at]['round']}, **{target:.4f}**. MB = payload per worker to the target, "
             f"the join phase (initial W down, init gradient up) included. bits/param = payload bits per parameter "
             f"per worker of one steady round, per direction (identity: 32). saving_rounds_only_x leaves out the "
             f"join phase's uncompressed W_0 and init gradient ({init0 / WORKERS / 1e6:.0f} MB per worker here), which "
             f"a long run amortises. Per-layer overrides name the "
             f"parameters they match ({HIDDEN}: the blocks' attention and MLP matrices).")
    return {"result": {"target_val_loss": target, "parameters": n_params, "rows": rows},
            "goals": goals, "best": best and best["pairing"], "table": notes + "\n\n" + table(rows, cols)}

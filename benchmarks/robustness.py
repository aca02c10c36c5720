"""`efmuon bench lr-robustness`: final validation loss vs step size for muon, muonmax and muonmax-momo.

The claim in small of "An Exploration of Non-Euclidean Gradient Descent: Muon and its Many Variants"
(arXiv 2510.09827, Fig. 1): Muon is sensitive to its learning rate, MuonMax much less, and MuonMax with
Momo's model truncation least. Each preset runs at {0.1, 1, 10, 100} x its tuned lr under the default
compression (`efmuon simulate`, in process), on the digits task (lsq at the smoke level). A run whose
gradient turns NaN/Inf is reported as diverged. The plot goes to docs/lr-robustness.png (full level).
"""
from __future__ import annotations

import math
import os
import tempfile
import time

from ..common.config import DEFAULT_DOWNLINK, DEFAULT_UPLINK, RunConfig
from ..simulate.sync import simulate
from .harness import bench, by_level, goal, table

PRESETS = ("muon", "muonmax", "muonmax-momo")
MULTIPLIERS = (0.1, 1.0, 10.0, 100.0)
# The tuned lr of each preset on digits (200 rounds, cosine, default compression), from a sweep of
# final validation loss: muon {0.02: 0.073, 0.05: 0.029, 0.1: 0.100}; muonmax {0.005: 1.97, 0.02: 0.162,
# 0.05: 0.051, 0.2: 0.056, 1.0: diverged}. muonmax-momo takes muonmax's (the truncation only shortens
# steps), so the two are compared at the same step sizes.
TUNED_LR = {"muon": 0.05, "muonmax": 0.05, "muonmax-momo": 0.05}
PLOT = os.path.join("docs", "lr-robustness.png")


def _one(task: str, rounds: int, workers: int, preset: str, lr: float) -> dict:
    cfg = RunConfig(task=task, workers=workers, rounds=rounds, preset=preset, lr=lr, plots="none",
                    eval_every=max(1, rounds // 4))
    t0 = time.perf_counter()
    try:
        s = simulate(cfg, quiet=True)["summary"]
        val, diverged = s["eval_loss_w"], None
        if val is None or not math.isfinite(val):
            val, diverged = None, "non-finite loss"
    except ValueError as exc:  # WorkerState refuses a NaN/Inf gradient: the run diverged
        if "NaN/Inf" not in str(exc):
            raise
        val, diverged = None, str(exc).split(":")[0]
    return {"preset": preset, "lr": lr, "final_val_loss_w": val, "diverged": diverged,
            "seconds": time.perf_counter() - t0}


def plot(rows: list[dict], path: str, title: str) -> str:
    """Final validation loss vs lr / tuned lr, one line per preset; diverged runs as x at the top."""
    from matplotlib.figure import Figure  # lazy, Agg canvas (as common/plots.py)

    fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    finite = [r["final_val_loss_w"] for r in rows if r["final_val_loss_w"] is not None]
    top = max(finite) * 1.5 if finite else 1.0
    for preset, marker in zip(PRESETS, "osD"):
        rs = [r for r in rows if r["preset"] == preset]
        xs = [r["lr"] / TUNED_LR[preset] for r in rs]
        ys = [r["final_val_loss_w"] if r["final_val_loss_w"] is not None else math.nan for r in rs]
        line, = ax.plot(xs, ys, marker=marker, label=preset)
        bad = [x for x, r in zip(xs, rs) if r["final_val_loss_w"] is None]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=line.get_color(), markersize=10)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("lr / tuned lr")
    ax.set_ylabel("final validation loss at W")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="x at the top: diverged", fontsize=9, title_fontsize=8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    return path


@bench("lr-robustness")
def bench_lr_robustness(level: str) -> dict:
    """Final validation loss vs lr (0.1x..100x tuned) for muon, muonmax, muonmax-momo (arXiv 2510.09827, in small)."""
    task = by_level(level, full="digits", quick="digits", smoke="lsq")
    rounds = by_level(level, full=200, quick=50, smoke=4)
    workers = by_level(level, full=4, quick=4, smoke=2)
    rows = []
    for preset in PRESETS:
        for mult in MULTIPLIERS:
            r = _one(task, rounds, workers, preset, TUNED_LR[preset] * mult)
            r["x_tuned"] = mult
            rows.append(r)
            shown = "diverged" if r["diverged"] else f"{r['final_val_loss_w']:.4g}"
            print(f"  {preset:13s} lr {r['lr']:<7g} ({mult:g}x): final val loss {shown} ({r['seconds']:.1f} s)",
                  flush=True)
    path = PLOT if level == "full" else os.path.join(tempfile.mkdtemp(prefix="lr-robustness-"), "lr-robustness.png")
    plot(rows, path, f"{task}, {rounds} rounds, {workers} workers, up {DEFAULT_UPLINK} / down {DEFAULT_DOWNLINK}")

    def worst(preset):
        vals = [r["final_val_loss_w"] for r in rows if r["preset"] == preset]
        return math.inf if any(v is None for v in vals) else max(vals)

    goals = [goal("muonmax-momo's worst final validation loss over the grid vs muon's",
                  f"{worst('muonmax-momo'):.4g} vs {worst('muon'):.4g}", "momo <= muon",
                  worst("muonmax-momo") <= worst("muon")),
             goal("muonmax-momo's worst vs muonmax's", f"{worst('muonmax-momo'):.4g} vs {worst('muonmax'):.4g}",
                  "momo <= muonmax", worst("muonmax-momo") <= worst("muonmax"))]
    cols = ["preset", "x_tuned", "lr", "final_val_loss_w", "diverged", "seconds"]
    return {"result": rows, "plot": path, "goals": goals, "table": table(rows, cols)}

"""`efmuon bench moe`: Muon vs the adamw preset (Adam on the aggregate G) on gpt-moe (MLA + MoE), default
compression both ways: the rounds each needs to reach the validation loss the best adamw run ends at."""
from __future__ import annotations

import time

from ..common.config import RunConfig
from ..simulate.sync import simulate
from .algorithm import _rounds_to
from .harness import bench, by_level, goal, table


def _run(label: str, rounds: int, every: int, options: dict, workers: int, **cfg) -> dict:
    t0 = time.perf_counter()
    rep = simulate(RunConfig(task="gpt-moe", workers=workers, rounds=rounds, eval_every=every,
                             task_options=dict(options), **cfg), quiet=True)
    seconds = time.perf_counter() - t0
    print(f"  {label:22s} final val {rep['summary']['eval_loss_w']:.4f} ({seconds:.0f} s)", flush=True)
    return {"label": label, "report": rep, "seconds": seconds, **cfg}


@bench("moe")
def bench_moe(level: str) -> dict:
    """Muon vs adamw on gpt-moe (MLA + MoE), default compression: rounds to the same validation loss."""
    rounds, every, adam_lrs, options, workers = by_level(
        level,
        full=(200, 5, (1e-3, 3e-3, 1e-2), {}, 4),
        quick=(60, 5, (3e-3,), {}, 4),
        smoke=(4, 1, (3e-3,), {"n_layers": 1, "context": 16, "batch_size": 4, "d_ff": 32}, 2))
    runs = [_run("muon", rounds, every, options, workers, preset="muon")]
    runs += [_run(f"adamw lr {lr:g}", rounds, every, options, workers, preset="adamw", lr=lr) for lr in adam_lrs]
    best_adam = min(runs[1:], key=lambda r: r["report"]["summary"]["eval_loss_w"])
    target = best_adam["report"]["summary"]["eval_loss_w"]
    rows = []
    for run in runs:
        rnd, up, down = _rounds_to(run["report"], target)
        rows.append({"optimizer": run["label"], "rounds": rounds, "rounds_to_target": rnd,
                     "MB_to_target_per_worker": (up + down) / workers / 1e6 if rnd else None,
                     "final_val_loss_w": run["report"]["summary"]["eval_loss_w"],
                     "final_loss_x": run["report"]["summary"]["final_loss_x"],
                     "seconds": round(run["seconds"], 1)})
    muon = rows[0]
    adam_rounds = next(r["rounds_to_target"] for r, run in zip(rows, runs) if run is best_adam)
    speedup = adam_rounds / muon["rounds_to_target"] if muon["rounds_to_target"] and adam_rounds else None
    goals = [goal("adamw's rounds / Muon's rounds to adamw's final validation loss", speedup and round(speedup, 2),
                  "> 1 (Muon reaches it sooner)", bool(speedup and speedup > 1))]
    cols = ["optimizer", "rounds", "rounds_to_target", "MB_to_target_per_worker", "final_val_loss_w",
            "final_loss_x", "seconds"]
    head = (f"target: the best adamw run's final validation loss, {target:.4f} (gpt-moe, {workers} workers, "
            f"uplink/downlink the defaults, eval every {every} rounds)\n\n")
    return {"result": {"target_val_loss": target, "rows": rows}, "rows": rows, "goals": goals,
            "table": head + table(rows, cols)}

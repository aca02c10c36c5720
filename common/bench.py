"""`efmuon bench NAME`: benchmarks that print a table, write JSON with a `goals` list, and can
update their section of BENCHMARKS.md. Every speed figure is a ratio to a baseline measured in
the same run (these machines are noisy). Service benchmarks (transport, scaling, memory) live in
efmuon.server.bench and register themselves here.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import torch

from efmuon.common.config import RunConfig

BENCHES: dict[str, Callable[[bool], dict]] = {}


def bench(name: str):
    def register(fn):
        BENCHES[name] = fn
        return fn
    return register


def machine() -> dict:
    return {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "date": _dt.date.today().isoformat()}


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def goal(name: str, value, target: str, met: bool) -> dict:
    return {"name": name, "value": value, "goal": target, "met": bool(met)}


def table(rows: list[dict], cols: list[str]) -> str:
    """A GitHub markdown table (also readable in a terminal)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- bytes
PAIRINGS = [
    ("ef21", "identity", "identity"),
    ("ef21", "topk:0.1", "identity"),
    ("ef21", "topk:0.1", "topk:0.1"),
    ("ef21", "topk:0.05", "topk:0.05"),
    ("ef21", "topk:0.05+natural", "topk:0.05+natural"),
    ("ef21", "topk:0.1+bf16", "topk:0.1+bf16"),
    ("ef21", "rankk:4", "rankk:8"),
    ("ef21", "sign", "topk:0.1"),
    ("ef14", "topk:0.1", "topk:0.1"),
]


def _rounds_to(report: dict, target: float, key: str = "val_loss_w"):
    """First evaluated round whose loss reaches `target`, with the cumulative bytes up to it."""
    up = down = 0
    init = report["summary"].get("init_bytes", {})
    up += init.get("up", {}).get("payload") or 0
    down += init.get("down", {}).get("payload") or 0
    for r in report["rounds"]:
        up += r["bytes"]["up"]["payload"]
        down += r["bytes"]["down"]["payload"]
        v = r.get(key)
        if v is not None and v <= target:
            return r["round"], up, down
    return None, up, down


def bytes_to_target(task: str, rounds: int, pairings, workers: int = 4, target_frac: float = 0.75,
                    eval_every: int = 10, **extra) -> dict:
    """Run each (method, uplink, downlink) pairing; target = identity's validation loss at target_frac * rounds."""
    from efmuon.common.simulate import simulate

    runs = []
    for method, up, down in pairings:
        cfg = RunConfig(task=task, workers=workers, rounds=rounds, method=method, uplink=up, downlink=down,
                        eval_every=eval_every, **extra)
        t0 = time.perf_counter()
        rep = simulate(cfg, quiet=True)
        runs.append({"method": method, "uplink": up, "downlink": down, "report": rep,
                     "seconds": time.perf_counter() - t0})
        print(f"  {method:5s} up {up:20s} down {down:20s} final val {rep['summary']['eval_loss_w']:.4f} "
              f"({runs[-1]['seconds']:.0f} s)", flush=True)
    base = runs[0]["report"]
    evaluated = [r for r in base["rounds"] if r.get("val_loss_w") is not None]
    at = min(len(evaluated) - 1, max(0, int(round(target_frac * len(evaluated))) - 1))
    target = evaluated[at]["val_loss_w"]
    rows = []
    r0, up0, down0 = _rounds_to(base, target)
    for run in runs:
        rnd, up, down = _rounds_to(run["report"], target)
        rows.append({
            "method": run["method"], "uplink": run["uplink"], "downlink": run["downlink"],
            "rounds_to_target": rnd,
            "up_MB_per_worker": up / workers / 1e6 if rnd else None,
            "down_MB_per_worker": down / workers / 1e6 if rnd else None,
            "total_MB_per_worker": (up + down) / workers / 1e6 if rnd else None,
            "saving_total_x": (up0 + down0) / (up + down) if rnd else None,
            "saving_up_x": up0 / up if rnd else None,
            "final_val_loss_w": run["report"]["summary"]["eval_loss_w"],
            "final_loss_x": run["report"]["summary"]["final_loss_x"],
        })
    return {"task": task, "target_val_loss": target, "rows": rows}


@bench("bytes")
def bench_bytes(quick: bool) -> dict:
    """Bytes (payload) to a fixed validation loss, per pairing, vs identity both ways."""
    if quick:
        res = bytes_to_target("lsq", 60, PAIRINGS[:3], eval_every=5)
    else:
        res = bytes_to_target("gpt-char", 300, PAIRINGS, eval_every=10)
    reached = [r for r in res["rows"][1:] if r["saving_total_x"]]
    best = max(reached, key=lambda r: r["saving_total_x"]) if reached else None
    goals = [goal("best total saving vs identity at the same validation loss (payload)",
                  best and round(best["saving_total_x"], 2), ">= 10x", bool(best and best["saving_total_x"] >= 10))]
    cols = ["method", "uplink", "downlink", "rounds_to_target", "up_MB_per_worker", "down_MB_per_worker",
            "total_MB_per_worker", "saving_up_x", "saving_total_x", "final_val_loss_w", "final_loss_x"]
    return {"result": res, "goals": goals, "best": best and f"{best['uplink']} / {best['downlink']}",
            "table": f"target validation loss {res['target_val_loss']:.4f} on {res['task']}\n\n" + table(res["rows"], cols)}


@bench("methods")
def bench_methods(quick: bool) -> dict:
    """EF21 vs EF14 (classic, airbench) side by side on lsq and digits."""
    rows = []
    from efmuon.common.simulate import simulate

    tasks = [("lsq", 100 if quick else 300), ("digits", 50 if quick else 200)]
    for task, rounds in tasks:
        for method, variant, up, down in [("ef21", "classic", "topk:0.1", "topk:0.1"),
                                          ("ef14", "classic", "topk:0.1", "topk:0.1"),
                                          ("ef21", "classic", "identity", "identity"),
                                          ("ef14", "airbench", "identity", "(quant:8 update)")]:
            cfg = RunConfig(task=task, workers=4, rounds=rounds, method=method, ef14_variant=variant,
                            uplink=up, downlink="identity" if down.startswith("(") else down)
            rep = simulate(cfg, quiet=True)
            s = rep["summary"]
            row = {"task": task, "method": method if method == "ef21" else f"ef14/{variant}", "uplink": up,
                   "downlink": down, "rounds": rounds, "final_loss_w": s["final_loss_w"],
                   "final_loss_x": s["final_loss_x"], "eval_loss_w": s["eval_loss_w"],
                   "up_MB": s["bytes"]["up"]["payload"] / 1e6, "down_MB": s["bytes"]["down"]["payload"] / 1e6}
            if s.get("f_star") is not None:
                row["suboptimality_w"] = s["final_loss_w"] - s["f_star"]
            rows.append(row)
            print(f"  {task} {row['method']} {up}/{down}: loss_w {s['final_loss_w']:.5g}", flush=True)
    cols = ["task", "method", "uplink", "downlink", "rounds", "final_loss_w", "final_loss_x", "suboptimality_w",
            "eval_loss_w", "up_MB", "down_MB"]
    return {"result": rows, "goals": [], "table": table(rows, cols)}


def update_markdown(path: str, name: str, command: str, body: str) -> None:
    """Replace (or append) the section of BENCHMARKS.md between <!-- bench:NAME --> markers."""
    m = machine()
    section = (f"<!-- bench:{name} -->\n### `{name}`\n\n`{command}` — {m['date']}, {m['cores']} cores, "
               f"torch {m['torch']}, python {m['python']}{', cuda' if m['cuda'] else ', no GPU'}\n\n{body}\n"
               f"<!-- /bench:{name} -->")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pat = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pat.sub(lambda _: section, text) if pat.search(text) else text.rstrip() + "\n\n" + section + "\n"
    with open(path, "w") as fh:
        fh.write(text)


def run_bench(name: str, quick: bool, report: str | None, markdown: str | None, command: str) -> dict:
    try:
        import efmuon.server.bench  # noqa: F401  (registers transport, scaling, memory)
    except ImportError:
        pass
    if name not in BENCHES:
        from efmuon.common.errors import ConfigError

        raise ConfigError(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHES))}")
    print(f"bench {name}{' (quick)' if quick else ''}: {BENCHES[name].__doc__.strip().splitlines()[0]}", flush=True)
    out = BENCHES[name](quick)
    out = {"bench": name, "quick": quick, "machine": machine(), "command": command, **out}
    print(out["table"])
    for g in out["goals"]:
        print(f"goal: {g['name']}: {g['value']} (goal {g['goal']}) -> {'met' if g['met'] else 'NOT met'}")
    if report:
        with open(report, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    if markdown:
        goals = "\n".join(f"- {g['name']}: **{g['value']}** (goal {g['goal']}: {'met' if g['met'] else 'not met'})"
                          for g in out["goals"])
        update_markdown(markdown, name, command, out["table"] + ("\n\n" + goals if goals else ""))
    return out

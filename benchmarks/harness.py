"""The benchmark registry (`@bench(NAME)`), sizes by level, timing, goals, tables and the BENCHMARKS.md
sections.

A benchmark is a function of its level: "full" (the run BENCHMARKS.md reports), "quick" (`--quick`)
or "smoke" (the test suite's: tiny sizes, one repeat, seconds; its figures mean nothing, only the
result's structure is checked)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import torch

BENCHES: dict[str, Callable[[str], dict]] = {}


def bench(name: str):
    def register(fn):
        BENCHES[name] = fn
        return fn
    return register


def by_level(level: str, full, quick, smoke):
    """The setting for `level` ("full", "quick" or "smoke")."""
    return {"full": full, "quick": quick, "smoke": smoke}[level]


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

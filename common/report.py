"""The JSON report of docs/design.md §8, the JSONL metrics stream, and progress lines for people.

The same `Report` is filled by `simulate`, `run` and the server, so the three produce one shape:

    {"config": {...},
     "rounds": [{"round", "loss_w", "loss_x", "seconds", "bytes": {"up": {payload, message, wire},
                                                                   "down": {...}}, ...}],
     "summary": {"rounds", "final_loss_w", "final_loss_x", "eval_loss_w", "bytes", "uncompressed_bytes",
                 "w_sha256", ...}}

Byte figures are totals over all clients for that round; per-client figures go under
`rounds[k].clients` when a transport measured them. `message` and `wire` are null where there is
no transport (simulate).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any


LEVELS = ("payload", "message", "wire")


def zero_bytes(transport: bool) -> dict:
    return {d: {lvl: (0 if (transport or lvl == "payload") else None) for lvl in LEVELS} for d in ("up", "down")}


def add_bytes(total: dict, part: dict) -> None:
    for d in ("up", "down"):
        for lvl in LEVELS:
            v = part.get(d, {}).get(lvl)
            if v is None:
                continue
            total[d][lvl] = (total[d][lvl] or 0) + int(v)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} TB"


def human_seconds(s: float) -> str:
    """12s, 3m05s, 2h07m: for a person reading a progress line."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _clean(x: Any) -> Any:
    """JSON cannot carry NaN/Inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class Report:
    """Collects rounds and the summary; streams JSONL metrics; prints progress lines."""

    def __init__(self, config: dict, transport: bool, metrics_path: str | None = None,
                 log_every: int = 10, total_rounds: int | None = None, stream=None, quiet: bool = False):
        self.config = config
        self.transport = transport
        self.rounds: list[dict] = []
        self.totals = zero_bytes(transport)
        self.init_bytes = zero_bytes(transport)
        self.summary: dict = {}
        self.log_every = max(1, int(log_every))
        self.total_rounds = total_rounds
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self._metrics = open(metrics_path, "w") if metrics_path else None

    def add_init(self, part: dict) -> None:
        """Bytes of the one-off exchange at join (initial W down, initial g_j up)."""
        add_bytes(self.init_bytes, part)
        add_bytes(self.totals, part)

    def add_round(self, round_: int, loss_w: float | None, loss_x: float | None, seconds: float,
                  bytes_: dict, **extra) -> dict:
        entry = {"round": int(round_), "loss_w": loss_w, "loss_x": loss_x, "seconds": float(seconds),
                 "bytes": bytes_, **extra}
        self.rounds.append(entry)
        add_bytes(self.totals, bytes_)
        if self._metrics:
            self._metrics.write(json.dumps(_clean(entry)) + "\n")
            self._metrics.flush()
        if not self.quiet and (round_ % self.log_every == 0 or round_ == 1 or round_ == self.total_rounds):
            self.print_progress(entry)
        return entry

    def print_progress(self, e: dict) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = len(self.rounds) / elapsed if elapsed > 0 else 0.0
        total = f"/{self.total_rounds}" if self.total_rounds else ""
        lw = "-" if e["loss_w"] is None else f"{e['loss_w']:.4f}"
        lx = "-" if e["loss_x"] is None else f"{e['loss_x']:.4f}"
        up = self.totals["up"]["wire" if self.transport else "payload"]
        down = self.totals["down"]["wire" if self.transport else "payload"]
        eta = ""
        if self.total_rounds and rate > 0 and e["round"] < self.total_rounds:
            eta = f"  ETA {human_seconds((self.total_rounds - e['round']) / rate)}"
        print(f"round {e['round']:>5}{total}  loss_w {lw}  loss_x {lx}  "
              f"up {human_bytes(up)}  down {human_bytes(down)}  {rate:.1f} rounds/s{eta}", file=self.stream, flush=True)

    def finish(self, **summary) -> dict:
        last = self.rounds[-1] if self.rounds else {}
        self.summary = {
            "rounds": len(self.rounds),
            "final_loss_w": last.get("loss_w"),
            "final_loss_x": last.get("loss_x"),
            "bytes": self.totals,
            "init_bytes": self.init_bytes,
            "seconds": time.perf_counter() - self.t0,
            **summary,
        }
        if self._metrics:
            self._metrics.close()
            self._metrics = None
        return self.summary

    def to_state(self) -> dict:
        """What a checkpoint keeps of the report so far (JSON-able; `from_state` takes it back)."""
        return {"rounds": self.rounds, "totals": self.totals, "init_bytes": self.init_bytes}

    def from_state(self, state: dict) -> None:
        """Continue the report `to_state` saved (a resumed run); keys it lacks keep their current value."""
        self.rounds = state.get("rounds", [])
        self.totals = state.get("totals", self.totals)
        self.init_bytes = state.get("init_bytes", self.init_bytes)

    def to_dict(self) -> dict:
        return _clean({"config": self.config, "rounds": self.rounds, "summary": self.summary})

    def write(self, path: str) -> None:
        """Write atomically: a reader never sees half a report."""
        tmp = f"{path}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def print_summary(self) -> None:
        s = self.summary
        if self.quiet or not s:
            return
        lvl = "wire" if self.transport else "payload"
        up, down = s["bytes"]["up"][lvl], s["bytes"]["down"][lvl]
        unc = s.get("uncompressed_bytes") or {}
        out = self.stream
        print("-" * 72, file=out)
        print(f"done: {s['rounds']} rounds in {s['seconds']:.1f} s", file=out)
        fw, fx, ev = s.get("final_loss_w"), s.get("final_loss_x"), s.get("eval_loss_w")
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        line = f"loss at W {fmt(fw)}   loss at X {fmt(fx)}   validation loss at W {fmt(ev)}"
        if s.get("f_star") is not None:
            line += f"   f* {s['f_star']:.6g}"
        print(line, file=out)
        for d, v in (("up", up), ("down", down)):
            u = unc.get(d)
            ratio = f"  ({u / v:.1f}x less than uncompressed {human_bytes(u)})" if u and v else ""
            print(f"bytes {d:<4} ({lvl}): {human_bytes(v)}{ratio}", file=out)
        sh = s.get("shard")
        where = f" (shard {sh['index']}/{sh['count']}'s layers only; merge the shards' reports for the model's)" \
            if isinstance(sh, dict) else ""
        print(f"w_sha256 {s.get('w_sha256')}{where}", file=out)

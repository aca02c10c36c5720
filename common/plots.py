"""PNG plots of a run report (docs/design.md §8 shape), for people: `write_plots` and the `compare` figure.

Works on any report of `simulate`, `run` or the server. Uses matplotlib's object API with the Agg
canvas (no pyplot, no display, no global state), so it is safe in threads and on headless machines.

Bytes are the best level the report has: `wire` (measured at the transport) when present, else
`payload` (simulate). Time is the simulated clock (`sim_time`) when the run has one, else wall time.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from .report import human_bytes

DPI = 110


def _figure(w: float = 7.0, h: float = 4.6):
    from matplotlib.figure import Figure  # lazy: matplotlib only when a figure is drawn

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def bytes_level(report: dict) -> str:
    """'wire' when the report measured it, else 'payload'."""
    b = (report.get("summary") or {}).get("bytes") or {}
    if any((b.get(d) or {}).get("wire") for d in ("up", "down")):
        return "wire"
    return "payload"


def _round_bytes(entry_bytes: dict, level: str) -> int:
    total = 0
    for d in ("up", "down"):
        side = (entry_bytes or {}).get(d) or {}
        v = side.get(level)
        if v is None:
            v = side.get("payload") or 0
        total += int(v)
    return total


def series(report: dict) -> dict:
    """Per-round arrays: round, loss_w, loss_x, cumulative bytes (up+down, from the join), time.

    Round 0 is the initial model (summary.initial_loss) when the report has it.
    """
    level = bytes_level(report)
    s = report.get("summary") or {}
    rounds = report.get("rounds") or []
    init_b = _round_bytes(s.get("init_bytes") or {}, level)
    simulated = any(r.get("sim_time") is not None for r in rounds)
    out = {"round": [], "loss_w": [], "loss_x": [], "bytes": [], "time": [], "level": level,
           "time_label": "simulated time (s)" if simulated else "wall time (s)"}
    if s.get("initial_loss") is not None:
        out["round"].append(0)
        out["loss_w"].append(s["initial_loss"])
        out["loss_x"].append(s["initial_loss"])
        out["bytes"].append(init_b)
        out["time"].append(s.get("sim_join_seconds", 0.0) if simulated else 0.0)
    cum_b, wall = init_b, 0.0
    for r in rounds:
        cum_b += _round_bytes(r.get("bytes") or {}, level)
        wall += float(r.get("seconds") or 0.0)
        if r.get("loss_w") is None:
            continue
        out["round"].append(r["round"])
        out["loss_w"].append(r["loss_w"])
        out["loss_x"].append(r.get("loss_x"))
        out["bytes"].append(cum_b)
        out["time"].append(r["sim_time"] if simulated and r.get("sim_time") is not None else wall)
    return out


def per_client_bytes(report: dict) -> dict[str, tuple[int, int]]:
    """{client: (up bytes, down bytes)} over the whole run, from whatever the report carries."""
    s = report.get("summary") or {}
    level = bytes_level(report)
    if isinstance(s.get("client_bytes"), dict):
        return {j: (int((v.get("up") or {}).get(level) or (v.get("up") or {}).get("payload") or 0),
                    int((v.get("down") or {}).get(level) or (v.get("down") or {}).get("payload") or 0))
                for j, v in s["client_bytes"].items()}
    if isinstance(s.get("links"), dict):
        return {j: (int(v["up"]["bytes"]), int(v["down"]["bytes"])) for j, v in s["links"].items()}
    acc: dict[str, list[int]] = {}
    sources = [s.get("init_clients") or {}] + [r.get("clients") or {} for r in report.get("rounds") or []]
    for clients in sources:
        for j, v in clients.items():
            a = acc.setdefault(str(j), [0, 0])
            for i, d in enumerate(("up", "down")):
                side = v.get(d) or {}
                a[i] += int(side.get(level) if side.get(level) is not None else (side.get("payload") or 0))
    return {j: (a[0], a[1]) for j, a in acc.items()}


def _log_if_wide(ax, values: Sequence[float]) -> None:
    vals = [v for v in values if v is not None and v > 0]
    if vals and max(vals) / min(vals) > 20:
        ax.set_yscale("log")


def run_title(report: dict) -> str:
    c = report.get("config") or {}
    s = report.get("summary") or {}
    fed = s.get("federated")
    who = (f"{fed['clients']} clients, {fed['per_round']}/round" if fed
           else f"{s.get('workers', c.get('workers'))} workers")
    return f"{c.get('task', '?')}  up {c.get('uplink', '?')}  down {c.get('downlink', '?')}  ({who})"


def _loss_panel(ax, ser, label_prefix: str = "", color=None, x_key: str = "round") -> None:
    x = ser[x_key]
    (line,) = ax.plot(x, ser["loss_w"], color=color, lw=1.6, label=f"{label_prefix}loss at W")
    xx = [a for a, b in zip(x, ser["loss_x"]) if b is not None]
    yx = [b for b in ser["loss_x"] if b is not None]
    if yx:
        ax.plot(xx, yx, color=line.get_color(), lw=1.2, ls="--", label=f"{label_prefix}loss at X")


def _bytes_formatter():
    from matplotlib.ticker import FuncFormatter  # lazy: matplotlib only when a figure is drawn

    return FuncFormatter(lambda v, _pos: human_bytes(v).replace(".00 ", " ") if v > 0 else "0")


def _bytes_log_axis(axis, values: Sequence[float]) -> None:
    """Log-scale byte axis labelled in B/KB/MB/GB; on a narrow range (< ~1.5 decades) minor ticks get labels too."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # lazy: matplotlib, as above

    axis.set_major_formatter(_bytes_formatter())
    pos = [v for v in values if v and v > 0]
    if pos and math.log10(max(pos) / min(pos)) < 1.5:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
        axis.set_minor_formatter(FuncFormatter(lambda v, _p: human_bytes(v).replace(".00 ", " ")))
    else:
        axis.set_minor_formatter(NullFormatter())


def write_plots(report: dict, out_dir: str, stem: str = "efmuon") -> list[str]:
    """Write <stem>-loss-rounds.png, -loss-bytes.png, -loss-time.png and -bytes-per-client.png; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    ser = series(report)
    title = run_title(report)
    panels = (("loss-rounds", lambda ax: _loss_vs_rounds(ax, ser, title)),
              ("loss-bytes", lambda ax: _loss_vs_bytes(ax, ser, title)),
              ("loss-time", lambda ax: _loss_vs_time(ax, ser, title)),
              ("bytes-per-client", lambda ax: _bytes_per_client(ax, per_client_bytes(report), ser["level"], title)))
    paths = []
    for name, draw in panels:
        fig = _figure()
        draw(fig.add_subplot())
        path = os.path.join(out_dir, f"{stem}-{name}.png")
        fig.savefig(path)
        paths.append(path)
    return paths


def _loss_vs_rounds(ax, ser: dict, title: str) -> None:
    _loss_panel(ax, ser)
    ax.set_xlabel("round")
    ax.set_ylabel("training loss f")
    ax.set_title(f"Loss vs rounds\n{title}", fontsize=10)
    _log_if_wide(ax, ser["loss_w"] + ser["loss_x"])
    ax.grid(True, alpha=0.3)
    ax.legend()


def _loss_vs_bytes(ax, ser: dict, title: str) -> None:
    _loss_panel(ax, ser, x_key="bytes")
    ax.set_xscale("log")
    _bytes_log_axis(ax.xaxis, ser["bytes"])
    ax.set_xlabel(f"bytes sent, up + down, all clients, cumulative ({ser['level']}, bytes, log scale)")
    ax.set_ylabel("training loss f")
    ax.set_title(f"Loss vs bytes\n{title}", fontsize=10)
    _log_if_wide(ax, ser["loss_w"] + ser["loss_x"])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _loss_vs_time(ax, ser: dict, title: str) -> None:
    _loss_panel(ax, ser, x_key="time")
    ax.set_xlabel(ser["time_label"])
    ax.set_ylabel("training loss f")
    ax.set_title(f"Loss vs {ser['time_label'].split(' (')[0]}\n{title}", fontsize=10)
    _log_if_wide(ax, ser["loss_w"] + ser["loss_x"])
    ax.grid(True, alpha=0.3)
    ax.legend()


def _bytes_per_client(ax, pcb: dict[str, tuple[int, int]], level: str, title: str) -> None:
    """Stacked bars per client (up to 64 clients), else histograms of the per-client bytes."""
    if not pcb:
        ax.text(0.5, 0.5, "this report has no per-client byte figures", ha="center", va="center")
        ax.set_axis_off()
        return
    ids = sorted(pcb, key=lambda j: int(j) if str(j).isdigit() else str(j))
    up = [pcb[j][0] for j in ids]
    down = [pcb[j][1] for j in ids]
    if len(ids) <= 64:
        xs = range(len(ids))
        ax.bar(xs, down, label="down", color="tab:blue")
        ax.bar(xs, up, bottom=down, label="up", color="tab:orange")
        ax.set_xticks(list(xs), ids, fontsize=7 if len(ids) > 16 else 9,
                      rotation=90 if len(ids) > 16 else 0)
        ax.set_xlabel("client")
        ax.set_ylabel(f"bytes ({level})")
        ax.yaxis.set_major_formatter(_bytes_formatter())
        ax.set_title(f"Bytes per client over the run (stacked)\n{title}", fontsize=10)
    else:
        tot = [u + d for u, d in zip(up, down)]
        pos = [v for v in up + down + tot if v > 0]
        lo, hi = (min(pos), max(pos)) if pos else (1, 10)
        bins = np.geomspace(max(1, lo * 0.9), hi * 1.1 + 1, 40)
        for vals, lab, col in ((down, "down", "tab:blue"), (up, "up", "tab:orange"), (tot, "up + down", "tab:gray")):
            ax.hist([max(v, 1) for v in vals], bins=bins, histtype="step", lw=1.6, label=lab, color=col)
        ax.set_xscale("log")
        _bytes_log_axis(ax.xaxis, pos)
        ax.set_xlabel(f"bytes per client over the run ({level}, log scale)")
        ax.set_ylabel("number of clients")
        ax.set_title(f"Bytes per client ({len(ids)} clients)\n{title}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()


# ---------------------------------------------------------------------------- compare

def run_label(report: dict, path: str | None = None) -> str:
    if path:
        return os.path.splitext(os.path.basename(path))[0]
    return run_title(report)


def compare_rows(reports: Sequence[dict], labels: Sequence[str]) -> list[dict]:
    rows = []
    for rep, lab in zip(reports, labels):
        s = rep.get("summary") or {}
        level = bytes_level(rep)
        b = s.get("bytes") or {}
        up = (b.get("up") or {}).get(level)
        down = (b.get("down") or {}).get(level)
        unc = s.get("uncompressed_bytes") or {}
        total = (up or 0) + (down or 0)
        unc_total = (unc.get("up") or 0) + (unc.get("down") or 0)
        rows.append({"run": lab, "rounds": s.get("rounds", len(rep.get("rounds") or [])),
                     "final_loss_w": s.get("final_loss_w"), "final_loss_x": s.get("final_loss_x"),
                     "bytes_up": up, "bytes_down": down, "level": level,
                     "saving": (unc_total / total) if total and unc_total else None,
                     "sim_time": s.get("sim_time")})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    head = ["run", "rounds", "final loss_w", "final loss_x", "bytes up", "bytes down", "level",
            "vs uncompressed"]
    if any(r.get("sim_time") is not None for r in rows):
        head.append("sim time")
    body = []
    for r in rows:
        line = [r["run"], str(r["rounds"]), fmt(r["final_loss_w"]), fmt(r["final_loss_x"]),
                human_bytes(r["bytes_up"]), human_bytes(r["bytes_down"]), r["level"],
                "-" if r["saving"] is None else f"{r['saving']:.1f}x less"]
        if len(head) > 8:
            line.append("-" if r.get("sim_time") is None else f"{r['sim_time']:.1f} s")
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))) for b in body]
    return "\n".join(lines)


def compare_figure(reports: Sequence[dict], labels: Sequence[str], out: str) -> str:
    """One PNG: loss vs rounds and loss vs bytes (log scale), every run overlaid (solid W, dashed X)."""
    fig = _figure(13.0, 5.0)
    ax_r, ax_b = fig.subplots(1, 2)
    allv, allb = [], []
    levels = set()
    for rep, lab in zip(reports, labels):
        ser = series(rep)
        levels.add(ser["level"])
        allv += [v for v in ser["loss_w"] + ser["loss_x"] if v is not None]
        allb += ser["bytes"]
        (line,) = ax_r.plot(ser["round"], ser["loss_w"], lw=1.6, label=f"{lab}: at W")
        c = line.get_color()
        xs = [a for a, b in zip(ser["round"], ser["loss_x"]) if b is not None]
        ax_r.plot(xs, [b for b in ser["loss_x"] if b is not None], lw=1.0, ls="--", color=c, label=f"{lab}: at X")
        ax_b.plot(ser["bytes"], ser["loss_w"], lw=1.6, color=c, label=f"{lab}: at W")
        xb = [a for a, b in zip(ser["bytes"], ser["loss_x"]) if b is not None]
        ax_b.plot(xb, [b for b in ser["loss_x"] if b is not None], lw=1.0, ls="--", color=c, label=f"{lab}: at X")
    for ax in (ax_r, ax_b):
        _log_if_wide(ax, allv)
        ax.set_ylabel("training loss f")
        ax.grid(True, which="both", alpha=0.3)
    ax_r.set_xlabel("round")
    ax_r.set_title("Loss vs rounds")
    ax_b.set_xscale("log")
    _bytes_log_axis(ax_b.xaxis, allb)
    ax_b.set_xlabel(f"bytes sent, up + down, cumulative ({'/'.join(sorted(levels))}, log scale)")
    ax_b.set_title("Loss vs bytes")
    ax_b.legend(fontsize=8)
    fig.suptitle(f"efmuon: {len(reports)} runs compared (solid: loss at W, dashed: loss at X)", fontsize=11)
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    fig.savefig(out)
    return out

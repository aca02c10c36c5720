"""PNG plots of a run report (docs/design.md §8 shape), for people: `write_plots` and the `compare` figure.

Works on any report of `simulate`, `run` or the server. Uses matplotlib's object API with the Agg
canvas (no pyplot, no display, no global state), so it is safe in threads and on headless machines.

Bytes are the best level the report has: `wire` (measured at the transport) when present, else
`payload` (simulate). Time is the simulated clock (`sim_time`) when the run has one, else wall time.

Reports whose rounds carry per-client entries (`rounds[k].clients`) also get a participation raster
(who submitted, who was dropped as a straggler, who was not sampled, per round), and reports with
catch-up bytes (federated simulation) a catch-up figure. `participation` and `catchup_series` compute
what those figures show, without matplotlib.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

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
    from matplotlib.ticker import FuncFormatter  # lazy: matplotlib, only to draw

    return FuncFormatter(lambda v, _pos: human_bytes(v).replace(".00 ", " ") if v > 0 else "0")


def _bytes_log_axis(axis, values: Sequence[float]) -> None:
    """Log-scale byte axis labelled in B/KB/MB/GB; on a narrow range (< ~1.5 decades) minor ticks get labels too."""
    from matplotlib.ticker import (  # lazy: matplotlib, as above
        FuncFormatter,
        LogLocator,
        NullFormatter,
    )

    axis.set_major_formatter(_bytes_formatter())
    pos = [v for v in values if v and v > 0]
    if pos and math.log10(max(pos) / min(pos)) < 1.5:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
        axis.set_minor_formatter(FuncFormatter(lambda v, _p: human_bytes(v).replace(".00 ", " ")))
    else:
        axis.set_minor_formatter(NullFormatter())


def write_plots(report: dict, out_dir: str, stem: str = "efmuon") -> list[str]:
    """Write <stem>-loss-rounds.png, -loss-bytes.png, -loss-time.png and -bytes-per-client.png, plus
    -participation.png when the rounds carry per-client entries and -catchup.png when any round had
    catch-up bytes; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    ser = series(report)
    title = run_title(report)
    panels = [("loss-rounds", lambda fig: _loss_vs_rounds(fig.add_subplot(), ser, title)),
              ("loss-bytes", lambda fig: _loss_vs_bytes(fig.add_subplot(), ser, title)),
              ("loss-time", lambda fig: _loss_vs_time(fig.add_subplot(), ser, title)),
              ("bytes-per-client",
               lambda fig: _bytes_per_client(fig.add_subplot(), per_client_bytes(report), ser["level"], title))]
    part = participation(report)
    if part is not None:
        panels.append(("participation", lambda fig: _participation(fig, part, title)))
    cu = catchup_series(report)
    if cu is not None:
        panels.append(("catchup", lambda fig: _catchup(fig, cu, title)))
    paths = []
    for name, draw in panels:
        fig = _figure(*_figure_size(name, part))
        draw(fig)
        path = os.path.join(out_dir, f"{stem}-{name}.png")
        fig.savefig(path)
        paths.append(path)
    return paths


def _figure_size(name: str, part: Participation | None) -> tuple[float, float]:
    if name == "participation" and part is not None:  # taller with more clients, within bounds
        return 8.0, min(9.0, max(3.6, 2.2 + 0.16 * len(part.clients)))
    if name == "catchup":
        return 7.0, 6.4
    return 7.0, 4.6


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


# ---------------------------------------------------------------------------- participation and catch-up

NOT_SAMPLED, SUBMITTED, DROPPED, NO_RECORD = 0, 1, 2, 3  # the cell states of `participation`
STATE_LABELS = {SUBMITTED: "took part (submitted)", DROPPED: "dropped (straggler)",
                NOT_SAMPLED: "not sampled", NO_RECORD: "no record of the round"}
# blue / orange / light grey tell apart with the common colour-vision deficiencies too
STATE_COLOURS = {NOT_SAMPLED: (0.90, 0.90, 0.90), SUBMITTED: (0.12, 0.47, 0.71),
                 DROPPED: (1.00, 0.50, 0.05), NO_RECORD: (1.0, 1.0, 1.0)}
EDGE_CELLS = 100  # cells get white edges only while both axes have at most this many


@dataclass
class Participation:
    """Who took part in which round: `state[i, c]` is client `clients[i]` in round `rounds[c]`."""

    rounds: list[int]
    clients: list[str]
    state: np.ndarray  # int8, (len(clients), len(rounds)): NOT_SAMPLED, SUBMITTED, DROPPED or NO_RECORD

    def cohort(self) -> np.ndarray:
        """Clients sampled per round (submitted + dropped); a round with no record counts 0."""
        return ((self.state == SUBMITTED) | (self.state == DROPPED)).sum(axis=0)

    def count(self, state: int) -> int:
        return int((self.state == state).sum())


def _client_key(j: str):
    return (0, int(j), "") if j.isdigit() else (1, 0, j)


def participation(report: dict) -> Participation | None:
    """The participation raster of a report, or None when no round has per-client entries (`clients`).

    A client in `rounds[k].clients` was sampled: it was dropped when its entry says `dropped`, or it
    is in the round's `dropped` (simulate) or `skipped_clients` (the server's partial rounds) list,
    and took part otherwise. A client absent from `clients` was not sampled. Where a round names its
    `cohort` (the networked server's cohort rounds) that list is who was sampled: its `clients` may also
    hold bytes of others (a late uplink counted in the oldest open round, the final `done` replies). Columns run over every
    round number from the first to the last entry; a round without an entry, or without `clients`,
    is NO_RECORD. Rows are the client ids 0 .. n-1 (n from the summary, else the largest id seen),
    or the ids seen, sorted, when some are not integers. Extra keys are ignored.
    """
    entries = [r for r in report.get("rounds") or [] if isinstance(r, dict) and r.get("round") is not None]
    if not any(isinstance(r.get("clients"), dict) for r in entries):
        return None
    per_round: dict[int, tuple[dict, set[str]]] = {}
    seen: set[str] = set()
    for r in entries:
        clients = r.get("clients")
        if not isinstance(clients, dict):
            continue
        late = {str(j) for key in ("dropped", "skipped_clients") if isinstance(r.get(key), (list, tuple))
                for j in r[key]}
        late |= {str(j) for j, v in clients.items() if isinstance(v, dict) and v.get("dropped")}
        if isinstance(r.get("cohort"), (list, tuple)):
            clients = {str(j): None for j in r["cohort"]}
        per_round[int(r["round"])] = ({str(j): v for j, v in clients.items()}, late)
        seen |= set(clients) | late
    seen = {str(j) for j in seen}
    if all(j.isdigit() for j in seen):
        s = report.get("summary") or {}
        n = max([int(j) + 1 for j in seen] + [v for v in ((s.get("federated") or {}).get("clients"), s.get("workers"))
                                              if isinstance(v, int) and not isinstance(v, bool)])
        ids = [str(j) for j in range(n)]
    else:
        ids = sorted(seen, key=_client_key)
    nums = sorted({int(r["round"]) for r in entries})
    rounds = list(range(nums[0], nums[-1] + 1))
    row = {j: i for i, j in enumerate(ids)}
    state = np.full((len(ids), len(rounds)), NO_RECORD, dtype=np.int8)
    for c, k in enumerate(rounds):
        if k not in per_round:
            continue
        clients, late = per_round[k]
        state[:, c] = NOT_SAMPLED
        for j in clients:
            state[row[j], c] = SUBMITTED
        for j in late:
            state[row[j], c] = DROPPED
    return Participation(rounds, ids, state)


def _cohort_text(part: Participation) -> str:
    recorded = (part.state != NO_RECORD).any(axis=0)
    cohort = part.cohort()[recorded]
    n = len(part.clients)
    if cohort.size and cohort.min() == cohort.max():
        size = f"{int(cohort[0])} of {n} clients per round"
    elif cohort.size:
        size = f"{int(cohort.min())}-{int(cohort.max())} of {n} clients per round (mean {cohort.mean():.1f})"
    else:
        size = f"{n} clients"
    drops = part.count(DROPPED)
    return f"{size}, {drops} drop{'' if drops == 1 else 's'} in {len(part.rounds)} rounds"


def _participation(fig, part: Participation, title: str) -> None:
    """The raster: rounds on x, client ids on y, one colour per state (STATE_COLOURS), a legend."""
    from matplotlib.patches import Patch  # lazy: matplotlib only when a figure is drawn
    from matplotlib.ticker import MaxNLocator  # lazy: as above

    ax = fig.add_subplot()
    palette = np.array([STATE_COLOURS[i] for i in range(len(STATE_COLOURS))], dtype=float)
    nrows, ncols = part.state.shape
    k0, k1 = part.rounds[0], part.rounds[-1]
    # More cells than pixels: antialiasing mixes neighbouring colours rather than dropping rows or rounds.
    interp = "nearest" if max(nrows, ncols) <= 400 else "antialiased"
    ax.imshow(palette[part.state], aspect="auto", interpolation=interp, origin="lower",
              extent=(k0 - 0.5, k1 + 0.5, -0.5, nrows - 0.5))
    if nrows <= EDGE_CELLS and ncols <= EDGE_CELLS:
        ax.set_xticks(np.arange(k0 - 0.5, k1 + 1.0), minor=True)
        ax.set_yticks(np.arange(-0.5, nrows), minor=True)
        ax.grid(True, which="minor", color="white", lw=0.6 if max(nrows, ncols) <= 40 else 0.3)
        ax.tick_params(which="minor", length=0)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    if all(j.isdigit() for j in part.clients):
        ax.yaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    elif nrows <= 40:
        ax.set_yticks(range(nrows), part.clients, fontsize=7)
    else:
        ax.set_yticks([])
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    ax.set_title(f"Participation: {_cohort_text(part)}\n{title}", fontsize=10)
    shown = [s for s in (SUBMITTED, DROPPED, NOT_SAMPLED, NO_RECORD) if s != NO_RECORD or part.count(s)]
    handles = [Patch(facecolor=STATE_COLOURS[s], edgecolor="0.4", lw=0.5,
                     label=f"{STATE_LABELS[s]}: {part.count(s)}") for s in shown]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title="client-rounds", title_fontsize=8)


def catchup_series(report: dict) -> dict | None:
    """Per round: catch-up bytes, their cumulative sum and the cumulative downlink payload (catch-up
    included, the join excluded); None when no round had catch-up bytes.

    A round's catch-up is its `catchup` entry, else the sum of its clients' `catchup`.
    """
    rounds, cu, down = [], [], []
    for r in report.get("rounds") or []:
        if not isinstance(r, dict) or r.get("round") is None:
            continue
        c = r.get("catchup")
        if c is None:
            c = sum(int(v.get("catchup") or 0) for v in (r.get("clients") or {}).values() if isinstance(v, dict))
        rounds.append(int(r["round"]))
        cu.append(int(c or 0))
        down.append(int((((r.get("bytes") or {}).get("down") or {}).get("payload")) or 0))
    if not any(cu):
        return None
    return {"round": rounds, "catchup": cu, "cum_catchup": np.cumsum(cu).tolist(),
            "cum_down": np.cumsum(down).tolist()}


def _catchup(fig, cu: dict, title: str) -> None:
    """Two panels: catch-up bytes per round (bars); cumulative catch-up vs cumulative downlink."""
    ax_b, ax_c = fig.subplots(2, 1, sharex=True)
    ax_b.bar(cu["round"], cu["catchup"], width=0.85 if len(cu["round"]) <= 200 else 1.0, color="tab:purple",
             label="catch-up")
    ax_b.yaxis.set_major_formatter(_bytes_formatter())
    ax_b.set_ylabel("catch-up bytes (payload)")
    share = cu["cum_catchup"][-1] / cu["cum_down"][-1] if cu["cum_down"][-1] else None
    note = f", {100 * share:.1f}% of the downlink" if share is not None else ""
    ax_b.set_title(f"Catch-up: {human_bytes(cu['cum_catchup'][-1])} over the run{note}\n{title}", fontsize=10)
    ax_b.grid(True, axis="y", alpha=0.3)
    ax_c.plot(cu["round"], cu["cum_down"], color="tab:blue", lw=1.6, label="downlink payload, catch-up included")
    ax_c.plot(cu["round"], cu["cum_catchup"], color="tab:purple", lw=1.6, label="catch-up")
    ax_c.fill_between(cu["round"], 0, cu["cum_catchup"], color="tab:purple", alpha=0.15)
    ax_c.yaxis.set_major_formatter(_bytes_formatter())
    ax_c.set_xlabel("round")
    ax_c.set_ylabel("cumulative bytes (payload)")
    ax_c.grid(True, alpha=0.3)
    ax_c.legend(fontsize=8)


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
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

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

"""`efmuon compare A.json B.json ... [--out compare.png]`: overlay runs and print a table.

The figure has two panels, loss vs rounds and loss vs bytes (up + down, log scale), with every run's
loss at W (solid) and at X (dashed). The table lists rounds, final loss at W and X, bytes up/down
(wire when the report measured it, else payload) and the saving against identity fp32.
"""
from __future__ import annotations

import json
import sys

from .errors import ConfigError
from .plots import compare_figure, compare_rows, format_table, run_label


def load_report(path: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"report {path!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"report {path!r} is not a readable JSON report: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list) or not isinstance(data.get("summary"), dict):
        raise ConfigError(f"report {path!r} is not an efmuon report (needs 'rounds' and 'summary')")
    return data


def compare(paths: list[str], out: str | None = "compare.png", labels: list[str] | None = None,
            stream=None) -> list[dict]:
    """Load the reports, write the figure to `out` (None: no figure), print the table; return its rows."""
    if not paths:
        raise ConfigError("compare needs at least one report")
    reports = [load_report(p) for p in paths]
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"--label was given {len(labels)} times for {len(paths)} reports")
    names = list(labels) if labels else [run_label(r, p) for r, p in zip(reports, paths)]
    if len(set(names)) < len(names):  # same file names in different folders: use the paths
        names = list(paths)
    rows = compare_rows(reports, names)
    out_stream = stream or sys.stdout
    print(format_table(rows), file=out_stream)
    if out:
        compare_figure(reports, names, out)
        print(f"figure: {out}", file=out_stream)
    return rows

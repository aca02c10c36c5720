"""What a finished run leaves behind: the JSON report and its PNG plots, where the config says."""
from __future__ import annotations

import os
import sys

from .config import RunConfig
from .report import Report


def plots_dir(cfg: RunConfig) -> str | None:
    """Where PNG plots go: `plots`, else the report's directory; None when disabled or nowhere to put them."""
    if cfg.plots is not None:
        return None if cfg.plots.strip().lower() in ("none", "off", "no", "false", "") else cfg.plots
    if cfg.report:
        return os.path.dirname(os.path.abspath(cfg.report))
    return None


def write_outputs(report: Report, cfg: RunConfig, quiet: bool = False, stream=None) -> dict:
    """Write the JSON report and the PNG plots (if asked for); return the report as a dict."""
    if cfg.report:
        report.write(cfg.report)
    data = report.to_dict()
    where = plots_dir(cfg)
    if where:
        from .plots import write_plots  # lazy: matplotlib only when plots are written

        stem = os.path.splitext(os.path.basename(cfg.report))[0] if cfg.report else "efmuon"
        paths = write_plots(data, where, stem)
        if not quiet:
            print(f"plots: {', '.join(paths)}", file=stream or sys.stdout, flush=True)
    return data


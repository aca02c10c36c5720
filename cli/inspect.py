"""`--print-config`: the configuration a command would run with, and the model's parameters as the
per-layer settings see them (name, shape, norm, uplink and downlink compressor)."""
from __future__ import annotations

import json
import sys

from ..common.algorithm import layer_compressors
from ..common.config import RunConfig
from ..common.model import Setup


def print_config(cfg: RunConfig, stream=None) -> None:
    """Resolve `cfg` against its task (as every driver does) and print it, then one line per parameter."""
    out = stream or sys.stdout
    setup = Setup(cfg)
    resolved = setup.cfg
    print(json.dumps(resolved.to_dict(), indent=1, sort_keys=True, default=str), file=out)
    up = layer_compressors(setup.specs, resolved.uplink, resolved.uplink_layers)
    down = layer_compressors(setup.specs, resolved.downlink, resolved.downlink_layers)
    rows = [(s.name, "x".join(map(str, s.shape)) or "scalar", s.norm, u.spec, d.spec)
            for s, u, d in zip(setup.specs, up, down)]
    widths = [max(len(r[i]) for r in rows + [("name", "shape", "norm", "uplink", "downlink")]) for i in range(5)]
    summary = getattr(setup.task, "model_summary", None)
    if summary is not None:
        print("\n" + summary(), file=out)
    print(f"\nparameters (name, shape, norm, uplink, downlink): {len(rows)}, {setup.numel:,} entries", file=out)
    for r in rows:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)), file=out)

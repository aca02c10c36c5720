"""The reports of a sharded run's servers, merged into one (`efmuon report merge`, and `efmuon run --shards N`
by itself): docs/design.md §6.3.

Each shard's server writes its own report (§8's shape) with `summary.shard`: its index, the count, its
layers (global indices and names), the hashes of its layers, and `layers_file`, a safetensors file beside
the report with its final W and X (keys "W/<name>" and "X/<name>"). The merge

- sums the byte figures (every level, every direction; per round, per client and in the summary), and
  `uncompressed_bytes`, `init_bytes`, `client_bytes` and `parameters`; a round's `seconds` is the slowest
  shard's (the clients wait for every shard); `summary.shards` keeps each shard's own figures;
- takes `w_sha256` / `x_sha256` of the WHOLE model from the shards' layer files (sha256 over every
  parameter's float32 bytes in sorted name order, exactly `params_sha256` of one server's W and X);
- evaluates the losses a shard cannot (it holds part of the model): the final `final_loss_w`/`final_loss_x`
  (training loss at W and X) and `eval_loss_w`/`eval_loss_x` (validation), from the saved layers with the
  run's task, as the single server evaluates them after its last round. Per-round `loss_w`/`loss_x` stay
  null in a sharded run (no process holds X whole during the run); `train_loss` (what the workers
  reported) is shard 0's.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import RunConfig, from_mapping
from .errors import ConfigError

LAYERS_SUFFIX = ".layers.safetensors"
# summary keys whose numeric leaves add up over the shards
_SUMMED = ("bytes", "init_bytes", "uncompressed_bytes", "client_bytes", "parameters")

__all__ = ["LAYERS_SUFFIX", "layers_path", "merge_files", "merge_reports", "shard_summary"]


def layers_path(report: str | os.PathLike) -> Path:
    """Where a shard whose report goes to `report` writes its layers: beside it, REPORT.layers.safetensors."""
    p = Path(report)
    return p.with_name((p.stem if p.suffix == ".json" else p.name) + LAYERS_SUFFIX)


def shard_summary(model, W: Sequence, X: Sequence, report: str | None, round_: int) -> dict:
    """`summary.shard` of a shard's report; writes its layers file when the run writes a report."""
    from .algorithm import params_sha256  # lazy: torch

    index, count = model.shard
    out = {"index": index, "count": count, "layers": list(model.layer_ids), "names": list(model.names),
           "w_sha256": params_sha256(W, model.names), "x_sha256": params_sha256(X, model.names),
           "layers_file": None}
    if report:
        from safetensors.torch import save_file  # lazy: only a shard that writes a report

        path = layers_path(report)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{kind}/{n}": t.detach().to("cpu").contiguous()
                   for kind, group in (("W", W), ("X", X)) for n, t in zip(model.names, group)}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"producer": "efmuon shard", "shard": f"{index}/{count}",
                                               "round": str(int(round_))})
        os.replace(tmp, path)
        out["layers_file"] = path.name
    return out


def _add(total, part):
    """Numbers add up leaf by leaf (None counts as nothing); anything else keeps the first value."""
    if isinstance(total, Mapping) and isinstance(part, Mapping):
        out = dict(total)
        for k, v in part.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    if isinstance(total, bool) or isinstance(part, bool):
        return total
    if isinstance(total, (int, float)) and isinstance(part, (int, float)):
        return total + part
    if total is None and isinstance(part, (int, float)):
        return part
    return total


def _shard_of(report: Mapping, where: str) -> dict:
    sh = (report.get("summary") or {}).get("shard")
    if not isinstance(sh, Mapping):
        raise ConfigError(f"{where} is not the report of a shard (no summary.shard): give the reports of "
                          "`efmuon server --shard I/N`, one per shard")
    return dict(sh)


def _same_config(a: Mapping, b: Mapping) -> bool:
    drop = ("report", "metrics", "plots")
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def _merge_rounds(reports: Sequence[Mapping]) -> list[dict]:
    rounds = [r.get("rounds") or [] for r in reports]
    if len({len(r) for r in rounds}) != 1:
        raise ConfigError(f"the shards' reports have {', '.join(str(len(r)) for r in rounds)} rounds: merge the "
                          "reports of one finished run")
    out = []
    for entries in zip(*rounds):
        if len({e.get("round") for e in entries}) != 1:
            raise ConfigError("the shards' reports list different rounds: merge the reports of one run")
        e = dict(entries[0])
        for other in entries[1:]:
            e["bytes"] = _add(e.get("bytes"), other.get("bytes"))
            if "clients" in e:
                e["clients"] = _add(e["clients"], other.get("clients") or {})
            if "skipped_clients" in other:
                e["skipped_clients"] = sorted(set(e.get("skipped_clients") or []) | set(other["skipped_clients"]))
        secs = [x.get("seconds") for x in entries if isinstance(x.get("seconds"), (int, float))]
        e["seconds"] = max(secs) if secs else e.get("seconds")
        e["shard_seconds"] = [x.get("seconds") for x in entries]
        out.append(e)
    return out


def _whole_model(reports: Sequence[Mapping], shards: Sequence[dict], where: Sequence[str]):
    """(names, W, X) of the whole model from the shards' layer files, or None when one is missing."""
    from safetensors import safe_open  # lazy: torch

    W, X = {}, {}
    for sh, w in zip(shards, where):
        name = sh.get("layers_file")
        if not name:
            return None
        path = Path(w).parent / name if w else Path(name)
        if not path.is_file():
            raise ConfigError(f"shard {sh['index']}'s layers file {path} (named by its report {w}) is missing: "
                              "keep it beside the report, or merge without it is impossible for the model's hashes")
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for n in sh["names"]:
                if f"W/{n}" not in keys or f"X/{n}" not in keys:
                    raise ConfigError(f"{path} lacks layer {n!r} of shard {sh['index']}: it is not this run's file")
                W[n], X[n] = f.get_tensor(f"W/{n}"), f.get_tensor(f"X/{n}")
    return W, X


def _sha(tensors: Mapping) -> str:
    h = hashlib.sha256()
    for n in sorted(tensors):
        h.update(tensors[n].detach().to("cpu").float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _evaluate(config: Mapping, W: Mapping, X: Mapping) -> dict:
    """The final losses of the whole model (module docstring), as one server's evaluation computes them."""
    from .federation import task_setup  # lazy: torch (the task)
    from .model import evaluate  # lazy: torch

    cfg = from_mapping({k: v for k, v in config.items() if k not in ("report", "metrics", "plots")},
                       RunConfig(), where="the shards' report config")
    setup, _ = task_setup(cfg)
    missing = [n for n in setup.names if n not in W]
    if missing:
        raise ConfigError(f"the shards' layers do not cover the model: {', '.join(missing[:5])} missing; give "
                          "every shard's report")
    task, model = setup.task, setup.task.build_model()
    w, x = [W[n] for n in setup.names], [X[n] for n in setup.names]
    return {"final_loss_w": evaluate(model, w, task.train_eval_loss), "final_loss_x": evaluate(model, x, task.train_eval_loss),
            "eval_loss_w": evaluate(model, w, task.eval_loss), "eval_loss_x": evaluate(model, x, task.eval_loss),
            "f_star": getattr(task, "f_star", None)}


def merge_reports(reports: Sequence[Mapping], where: Sequence[str] | None = None, evaluate: bool = True) -> dict:
    """One report of the whole run from its shards' reports (module docstring). `where`: each report's
    path (its layers file is found beside it). Raises ConfigError naming what does not fit together."""
    where = list(where) if where is not None else [""] * len(reports)
    shards = [_shard_of(r, w or f"report {i}") for i, (r, w) in enumerate(zip(reports, where))]
    count = shards[0].get("count")
    got = sorted(s.get("index") for s in shards)
    if any(s.get("count") != count for s in shards) or got != list(range(count or 0)):
        raise ConfigError(f"the reports are of shards {got} of {sorted({s.get('count') for s in shards})}: give every "
                          f"shard's report once (0..N-1 of one run)")
    order = sorted(range(len(reports)), key=lambda i: shards[i]["index"])
    reports, shards, where = [reports[i] for i in order], [shards[i] for i in order], [where[i] for i in order]
    cfg0 = reports[0].get("config") or {}
    for r, w in zip(reports[1:], where[1:]):
        if not _same_config(cfg0, r.get("config") or {}):
            raise ConfigError(f"{w or 'a report'} has another run configuration than shard 0's: merge one run's shards")
    summaries = [r.get("summary") or {} for r in reports]
    summary = {k: v for k, v in summaries[0].items() if k != "shard"}
    for s in summaries[1:]:
        for k in _SUMMED:
            if k in s:
                summary[k] = _add(summary.get(k), s[k])
    secs = [s.get("seconds") for s in summaries if isinstance(s.get("seconds"), (int, float))]
    summary["seconds"] = max(secs) if secs else summary.get("seconds")
    summary["shards"] = [{**sh, "bytes": s.get("bytes"), "seconds": s.get("seconds"),
                          "server_peak_rss_bytes": s.get("server_peak_rss_bytes"), "resilience": s.get("resilience")}
                         for sh, s in zip(shards, summaries)]
    summary["w_sha256"] = summary["x_sha256"] = None
    for k in ("final_loss_w", "final_loss_x", "eval_loss_w", "eval_loss_x"):
        summary[k] = None
    if not summaries[0].get("partial"):
        whole = _whole_model(reports, shards, where)
        if whole is not None:
            W, X = whole
            summary["w_sha256"], summary["x_sha256"] = _sha(W), _sha(X)
            if evaluate:
                summary.update(_evaluate(cfg0, W, X))
    return {"config": dict(cfg0), "rounds": _merge_rounds(reports), "summary": summary}


def merge_files(paths: Sequence[str], out: str | None = None, evaluate: bool = True) -> dict:
    """`efmuon report merge A.json B.json -o merged.json`: read, merge, write (atomically) when `out` is given."""
    if len(paths) < 1:
        raise ConfigError("give the report of every shard (efmuon report merge A.json B.json ... -o merged.json)")
    reports = []
    for p in paths:
        try:
            with open(p) as fh:
                reports.append(json.load(fh))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the report {p}: {exc}") from None
    merged = merge_reports(reports, list(paths), evaluate=evaluate)
    if out:
        merged["config"]["report"] = out
        tmp = f"{out}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(merged, fh, indent=1)
        os.replace(tmp, out)
    return merged

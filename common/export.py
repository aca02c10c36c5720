"""The trained model as a safetensors file: named tensors plus metadata, loadable without efmuon.

`efmuon server|run --save-model PATH.safetensors` writes W (the model the workers hold) when the run
has finished; `efmuon export CKPT OUT.safetensors` writes W (or, with `--which x`, X: the server's
exact iterate) from a server checkpoint. Either file loads straight into the task's model:

    model = make_task(...).build_model()
    model.load_state_dict(safetensors.torch.load_file(PATH), strict=True)

Tensors are keyed by the model's parameter names (`named_parameters()`), float32, on the CPU. The
built-in tasks have no buffers, so the parameters are the whole state dict. The metadata (strings,
as safetensors requires) holds:

    format      "pt"                 (the key other safetensors readers look for)
    producer    "efmuon"
    tensors     "W" or "X"           which of the server's two models the file holds
    task        the run's task name
    config      the run configuration as JSON (`RunConfig.to_dict()`)
    round       the server's step count when it was taken (= the run's rounds at the end of a run)
    w_sha256    `params_sha256(W, names)`: the report's summary.w_sha256
    x_sha256    `params_sha256(X, names)`: the report's summary.x_sha256
    sha256      `params_sha256` of the tensors in this file (w_sha256 or x_sha256)

An output path that exists is refused unless `force`; the file is written next to its final name
and renamed into place, so a reader never sees half a file.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .algorithm import params_sha256
from .checkpoint import load_server
from .errors import ConfigError, FrameError

WHICH = ("w", "x")
PRODUCER = "efmuon"


def check_output(path: str | os.PathLike, force: bool = False, force_flag: str | None = "--force") -> Path:
    """The output path, or ConfigError: it exists (and not `force`), is a directory, or its folder does not exist.
    `force_flag`: the flag that overwrites, named in the refusal (None: the command has none)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a directory: give the model file's path (e.g. {p / 'model.safetensors'})")
    if p.exists() and not force:
        raise _exists(p, force_flag)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {p}: the folder {parent} does not exist")
    return p


def _exists(p: Path, force_flag: str | None) -> ConfigError:
    how = f"give another path, remove it, or pass {force_flag} to overwrite it" if force_flag else \
        "give another path or remove it"
    return ConfigError(f"{p} already exists: {how}")


def model_metadata(cfg: Mapping | None, round_: int, names: Sequence[str], W: Sequence[torch.Tensor],
                   X: Sequence[torch.Tensor] | None, which: str) -> dict[str, str]:
    """The metadata of a model file (module docstring)."""
    cfg = dict(cfg or {})
    meta = {"format": "pt", "producer": PRODUCER, "tensors": which.upper(), "task": str(cfg.get("task", "")),
            "config": json.dumps(cfg, sort_keys=True, default=str), "round": str(int(round_)),
            "w_sha256": params_sha256(W, names)}
    if X is not None:
        meta["x_sha256"] = params_sha256(X, names)
    meta["sha256"] = meta["w_sha256"] if which == "w" else meta["x_sha256"]
    return meta


def save_model(path: str | os.PathLike, names: Sequence[str], W: Sequence[torch.Tensor],
               X: Sequence[torch.Tensor] | None = None, *, cfg: Mapping | None = None, round_: int = 0,
               which: str = "w", force: bool = False, force_flag: str | None = "--force") -> dict[str, str]:
    """Write W (which="w") or X (which="x") keyed by `names` to `path`; returns the metadata written.
    `force_flag`: as in `check_output`."""
    if which not in WHICH:
        raise ConfigError(f"which={which!r}; choose one of: {', '.join(WHICH)}")
    if which == "x" and X is None:
        raise ConfigError("which='x' needs X")
    if len(names) != len(W) or (X is not None and len(names) != len(X)):
        raise ConfigError(f"{len(names)} parameter names for {len(W)} tensors")
    if len(set(names)) != len(names):
        raise ConfigError("the parameter names are not unique")
    p = check_output(path, force, force_flag)
    meta = model_metadata(cfg, round_, names, W, X, which)
    chosen = W if which == "w" else X
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in zip(names, chosen)}
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if not force and p.exists():  # appeared while we wrote: still never overwrite it
            raise _exists(p, force_flag)
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return meta


def read_model(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by name, metadata) of a model file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, which: str = "w",
                      force: bool = False) -> dict[str, str]:
    """`efmuon export`: W (or X) of a server checkpoint (a checkpoint directory, or a run's DIR: its newest)
    as a model file. ConfigError for a worker checkpoint; FrameError for a damaged one or none at all."""
    if which not in WHICH:
        raise ConfigError(f"--which {which!r}; choose one of: {', '.join(WHICH)}")
    check_output(out, force)  # before reading a possibly large checkpoint
    try:
        tensors, m = load_server(ckpt)
    except ConfigError as exc:  # a worker checkpoint (load names the kinds)
        raise ConfigError(f"{exc}: efmuon export takes the server's checkpoints (the run's --checkpoint-dir DIR, "
                          "not DIR/worker-J)") from None
    where = m.get("path", str(ckpt))
    layers = m.get("layers") or []
    names = [layer.get("name") if isinstance(layer, dict) else None for layer in layers]
    if not names or not all(isinstance(n, str) for n in names):
        raise FrameError(f"{where}: the manifest's layer names are missing or malformed")
    try:
        W = [tensors[f"W/{i}"] for i in range(len(names))]
        X = [tensors[f"X/{i}"] for i in range(len(names))]
    except KeyError as exc:
        raise FrameError(f"{where}: tensor {exc.args[0]!r} is missing") from None
    saved = m.get("w_sha256")
    if saved is not None and params_sha256(W, names) != saved:
        raise FrameError(f"{where}: W does not hash to the manifest's w_sha256 {saved}: the checkpoint is damaged")
    return save_model(out, names, W, X, cfg=m.get("config"), round_=int(m.get("round", 0)), which=which,
                      force=force)

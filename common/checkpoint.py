"""Server and worker checkpoints: what each side saves and how it is restored (the file format,
atomic writes and verified reads are `efmuon.common.checkpoint_format`).

The manifest holds the format version, the kind ("server" / "worker"), the round, the run
configuration (`RunConfig.to_dict()`), the layer names and shapes, caller metadata (`extra`,
per-client `clients`) and the tensor entries.

Tensor names. Server: ``X/i``, ``W/i``, ``G/i`` (layer i), ``G_j/j/i`` (client j's estimator),
``ef14/i`` (airbench error buffer), ``adam_m/i``, ``adam_v/i`` (preset adamw's moments); worker: ``W/i``, ``M/i``, ``Gj/i``, ``error/i``; both:
``rng/torch`` (torch.get_rng_state()), ``rng/numpy`` (numpy's global MT19937 key) and
``extra/NAME`` for caller tensors (e.g. a data sampler's torch.Generator state).

`restore_*` check the names, shapes and dtypes against the state being restored (and the
configuration) before changing anything: `ConfigError` for a checkpoint of another model or
configuration, `FrameError` for a damaged one.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from .algorithm import params_sha256
from .checkpoint_format import (
    DEFAULT_KEEP,
    FORMAT_VERSION,
    TensorWriter,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load,
    packable,
    publish,
    write_file,
)
from .config import RunConfig
from .errors import ConfigError, FrameError

# Fields of RunConfig that do not change the algorithm's arithmetic: a resumed run may differ in them.
EXECUTION_KEYS = frozenset({"device", "threads", "eval_every", "log_every", "report", "metrics", "plots"})


def _write_tensors(path: Path, buffers: list[bytes]) -> None:
    """Write tensors.bin (a seam the tests use to simulate a crash mid-write)."""
    write_file(path, buffers)


def _add_rng(w: TensorWriter, manifest: dict) -> None:
    w.add("rng/torch", torch.get_rng_state())
    st = np.random.get_state()
    if st[0] == "MT19937":
        w.add("rng/numpy", torch.from_numpy(np.asarray(st[1], dtype=np.uint32).astype(np.int64)))
        manifest["rng"] = {"numpy": {"pos": int(st[2]), "has_gauss": int(st[3]), "cached_gaussian": float(st[4])}}
    py = random.getstate()
    manifest.setdefault("rng", {})["python"] = {"version": py[0], "state": list(py[1]), "gauss_next": py[2]}


def _base_manifest(kind: str, round_: int, cfg: RunConfig | Mapping | None, specs, extra) -> dict:
    cfg_dict = cfg.to_dict() if isinstance(cfg, RunConfig) else (dict(cfg) if cfg is not None else None)
    return {
        "format": "efmuon-checkpoint",
        "version": FORMAT_VERSION,
        "kind": kind,
        "round": int(round_),
        "created": time.time(),
        "config": packable(cfg_dict, "config"),
        "layers": [{"name": s.name, "shape": list(s.shape), "norm": s.norm} for s in specs],
        "extra": packable(dict(extra or {}), "extra"),
    }


# --------------------------------------------------------------------------------------------
# validation against a live state
# --------------------------------------------------------------------------------------------


def _fmt(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _expect(tensors: Mapping[str, torch.Tensor], name: str, like: torch.Tensor, where: str) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise FrameError(f"{where}: tensor {name!r} is missing")
    if tuple(t.shape) != tuple(like.shape):
        raise ConfigError(f"checkpoint tensor {name!r} has shape {_fmt(t.shape)}, the model has {_fmt(like.shape)}")
    if t.dtype != like.dtype:
        raise ConfigError(f"checkpoint tensor {name!r} has dtype {t.dtype}, the model has {like.dtype}")
    return t.to(like.device)


def _check_layers(m: dict, specs, where: str) -> None:
    layers = m["layers"]
    if len(layers) != len(specs):
        raise ConfigError(f"{where}: the checkpoint has {len(layers)} layers, the model has {len(specs)}")
    for i, (l, s) in enumerate(zip(layers, specs)):
        if not isinstance(l, dict):
            raise FrameError(f"{where}: layer entry {i} is not a map")
        if l.get("name") != s.name:
            raise ConfigError(f"{where}: checkpoint layer {i} is {l.get('name')!r}, the model's is {s.name!r}")
        if tuple(l.get("shape") or ()) != tuple(s.shape):
            raise ConfigError(f"{where}: checkpoint layer {s.name!r} has shape {_fmt(l.get('shape') or ())}, "
                              f"the model has {_fmt(s.shape)}")


def check_config(saved: Mapping | None, cfg: RunConfig, ignore: Iterable[str] = ()) -> None:
    """Raise ConfigError when the saved configuration differs from `cfg` in a field that changes the run.

    Execution-only fields (device, threads, report paths, ...) and the names in `ignore` may differ.
    """
    if saved is None:
        return
    skip = EXECUTION_KEYS | set(ignore)
    now = cfg.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
             if k not in skip and k in saved and saved.get(k) != now[k]]
    if diffs:
        raise ConfigError("the checkpoint was written by a different configuration (" + "; ".join(diffs) +
                          "); start a new run, or resume with the original settings")


def _restore_rng(tensors: Mapping[str, torch.Tensor], m: dict) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"].to(torch.uint8))
    meta = m.get("rng") or {}
    npm = meta.get("numpy")
    if "rng/numpy" in tensors and isinstance(npm, dict):
        key = tensors["rng/numpy"].numpy().astype(np.uint32)
        if key.shape == (624,):
            np.random.set_state(("MT19937", key, int(npm["pos"]), int(npm["has_gauss"]), float(npm["cached_gaussian"])))
    py = meta.get("python")
    if isinstance(py, dict) and isinstance(py.get("state"), list):
        random.setstate((py["version"], tuple(py["state"]), py.get("gauss_next")))


# --------------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------------


def save_server(directory: str | os.PathLike, state, cfg: RunConfig | None = None, extra: Mapping | None = None, *,
                clients: Mapping[int, Mapping] | None = None, extra_tensors: Mapping[str, torch.Tensor] | None = None,
                keep: int = DEFAULT_KEEP) -> Path:
    """Checkpoint a `ServerState` into DIR/round-NNNNNN (atomically); returns that path.

    `cfg` defaults to `state.cfg`. `clients` is per-client metadata (e.g. ``{3: {"last_round": 7}}``),
    `extra` any other msgpack-able metadata, `extra_tensors` more tensors (read back as ``extra/NAME``).
    """

    cfg = cfg if cfg is not None else state.cfg
    w = TensorWriter()
    m = _base_manifest("server", state.round, cfg, state.specs, extra)
    m["n_clients"] = int(state.n)
    m["stale_nuclear"] = None if state.stale_nuclear is None else float(state.stale_nuclear)
    momo = getattr(state, "momo", None)  # muonmax-momo: the loss model, <W, G> after the last step, its t
    m["momo"] = None if momo is None else {k: (None if v is None else float(v)) for k, v in momo.items()}
    m["w_sha256"] = params_sha256(state.W, [s.name for s in state.specs])
    for key, ts in (("X", state.X), ("W", state.W), ("G", state.G)):
        for i, t in enumerate(ts):
            w.add(f"{key}/{i}", t)
    if state.estimators is not None:
        m["estimators"] = sorted(int(j) for j in state.estimators)
        for j in m["estimators"]:
            for i, t in enumerate(state.estimators[j]):
                w.add(f"G_j/{j}/{i}", t)
    else:
        m["estimators"] = None
    m["ef14_buffer"] = state.ef14_buffer is not None
    if state.ef14_buffer is not None:
        for i, t in enumerate(state.ef14_buffer):
            w.add(f"ef14/{i}", t)
    adam = getattr(state, "adam", None)
    m["adam"] = adam is not None
    if adam is not None:
        for key, ts in zip(("adam_m", "adam_v"), adam):
            for i, t in enumerate(ts):
                w.add(f"{key}/{i}", t)
    m["clients"] = [[int(j), packable(dict(v), f"clients[{j}]")] for j, v in sorted((clients or {}).items())]
    for name, t in (extra_tensors or {}).items():
        w.add(f"extra/{name}", t)
    _add_rng(w, m)
    m["tensors"] = w.entries
    return publish(Path(directory), m, w.buffers, state.round, keep, write_tensors=_write_tensors)


def load_server(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a server checkpoint (a checkpoint dir, or DIR with LATEST). Returns (tensors, manifest).

    `manifest["clients"]` comes back as ``{client_id: metadata}``.
    """
    tensors, m = load(path, kind="server")
    clients = m.get("clients") or []
    try:
        m["clients"] = {int(j): v for j, v in clients}
    except (TypeError, ValueError):
        raise FrameError(f"{m['path']}: manifest field 'clients' is malformed") from None
    return tensors, m


def restore_server(state, loaded: tuple[dict[str, torch.Tensor], dict], *, check_cfg: bool = True,
                   ignore: Iterable[str] = (), restore_rng: bool = True) -> dict:
    """Put a loaded server checkpoint into `state` (X, W, G, estimators, round, stale_nuclear, Momo state, ef14 buffer).

    Everything is validated first (layer names, shapes, dtypes, client ids, configuration unless
    `check_cfg=False`); `state` is changed only when all of it matches. Returns the manifest.
    """
    tensors, m = loaded
    where = f"checkpoint {m.get('path', '?')}"
    if m.get("kind") != "server":
        raise ConfigError(f"{where} is a {m.get('kind')} checkpoint, not a server checkpoint")
    _check_layers(m, state.specs, where)
    if check_cfg:
        check_config(m.get("config"), state.cfg, ignore)
    if m.get("n_clients") != state.n:
        raise ConfigError(f"{where} has {m.get('n_clients')} clients, the server has {state.n}")
    X = [_expect(tensors, f"X/{i}", x, where) for i, x in enumerate(state.X)]
    W = [_expect(tensors, f"W/{i}", x, where) for i, x in enumerate(state.X)]
    G = [_expect(tensors, f"G/{i}", x, where) for i, x in enumerate(state.X)]
    est = None
    ids = m.get("estimators")
    if state.estimators is not None:
        est = {}
        if ids is None:
            raise ConfigError(f"{where} has no per-client estimators, but this server keeps them")
        if not isinstance(ids, list):
            raise FrameError(f"{where}: manifest field 'estimators' is malformed")
        for j in ids:
            if not isinstance(j, int) or not 0 <= j < state.n:
                raise FrameError(f"{where}: estimator of unknown client {j!r} (clients are 0..{state.n - 1})")
            est[j] = [_expect(tensors, f"G_j/{j}/{i}", x, where) for i, x in enumerate(state.X)]
    buf = None
    if state.ef14_buffer is not None:
        if not m.get("ef14_buffer"):
            raise ConfigError(f"{where} has no ef14 airbench buffer, but the configuration uses one")
        buf = [_expect(tensors, f"ef14/{i}", x, where) for i, x in enumerate(state.X)]
    adam = None
    if getattr(state, "adam", None) is not None:
        if not m.get("adam"):
            raise ConfigError(f"{where} has no Adam moments, but the configuration uses preset adamw")
        adam = tuple([_expect(tensors, f"{key}/{i}", x, where) for i, x in enumerate(state.X)]
                     for key in ("adam_m", "adam_v"))
    sn = m.get("stale_nuclear")
    if sn is not None and not isinstance(sn, (int, float)):
        raise FrameError(f"{where}: stale_nuclear {sn!r} is not a number")
    momo = m.get("momo")
    if getattr(state, "momo", None) is not None:
        if not isinstance(momo, dict) or not isinstance(momo.get("loss_model"), (int, float)) or not all(
                v is None or isinstance(v, (int, float)) for v in momo.values()):
            raise ConfigError(f"{where} has no Momo state (loss model) though this run's preset is muonmax-momo; "
                              "resume it with the preset it was written with")
    # all checked: commit
    state.X, state.W, state.G = X, W, G
    if getattr(state, "momo", None) is not None:
        state.momo = {"loss_model": float(momo["loss_model"]),
                      **{k: None if momo.get(k) is None else float(momo[k]) for k in ("wg", "t")}}
    if est is not None:
        state.estimators = est
    if buf is not None:
        state.ef14_buffer = buf
    if adam is not None:
        state.adam = adam
    state.stale_nuclear = None if sn is None else float(sn)
    state.round = int(m["round"])
    if restore_rng:
        _restore_rng(tensors, m)
    return m


# --------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------


def save_worker(directory: str | os.PathLike, state, client_id: int | None = None, extra: Mapping | None = None, *,
                extra_tensors: Mapping[str, torch.Tensor] | None = None, keep: int = DEFAULT_KEEP) -> Path:
    """Checkpoint a `WorkerState` (W, M, Gj, error, round) into DIR/round-NNNNNN; returns that path."""

    client_id = state.client if client_id is None else int(client_id)
    if client_id != state.client:
        raise ConfigError(f"save_worker: client_id {client_id} but the state belongs to client {state.client}")
    w = TensorWriter()
    m = _base_manifest("worker", state.round, state.cfg, state.specs, extra)
    m["client_id"] = client_id
    m["w_sha256"] = params_sha256(state.W, [s.name for s in state.specs])
    for key, ts in (("W", state.W), ("M", state.M), ("Gj", state.Gj)):
        for i, t in enumerate(ts):
            w.add(f"{key}/{i}", t)
    m["error"] = state.error is not None
    if state.error is not None:
        for i, t in enumerate(state.error):
            w.add(f"error/{i}", t)
    for name, t in (extra_tensors or {}).items():
        w.add(f"extra/{name}", t)
    _add_rng(w, m)
    m["tensors"] = w.entries
    return publish(Path(directory), m, w.buffers, state.round, keep, write_tensors=_write_tensors)


def load_worker(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a worker checkpoint. Returns (tensors, manifest)."""
    tensors, m = load(path, kind="worker")
    if not isinstance(m.get("client_id"), int):
        raise FrameError(f"{m['path']}: manifest field 'client_id' is missing")
    return tensors, m


def restore_worker(state, loaded: tuple[dict[str, torch.Tensor], dict], *, check_cfg: bool = True,
                   ignore: Iterable[str] = (), restore_rng: bool = True) -> dict:
    """Put a loaded worker checkpoint into `state` (W, M, Gj, error, round), after validating all of it."""
    tensors, m = loaded
    where = f"checkpoint {m.get('path', '?')}"
    if m.get("kind") != "worker":
        raise ConfigError(f"{where} is a {m.get('kind')} checkpoint, not a worker checkpoint")
    if m.get("client_id") != state.client:
        raise ConfigError(f"{where} belongs to client {m.get('client_id')}, this worker is client {state.client}")
    _check_layers(m, state.specs, where)
    if check_cfg:
        check_config(m.get("config"), state.cfg, ignore)
    W = [_expect(tensors, f"W/{i}", x, where) for i, x in enumerate(state.W)]
    M = [_expect(tensors, f"M/{i}", x, where) for i, x in enumerate(state.W)]
    Gj = [_expect(tensors, f"Gj/{i}", x, where) for i, x in enumerate(state.W)]
    err = None
    if state.error is not None:
        if not m.get("error"):
            raise ConfigError(f"{where} has no ef14 error buffer, but this worker's method (ef14) uses one")
        err = [_expect(tensors, f"error/{i}", x, where) for i, x in enumerate(state.W)]
    state.W, state.M, state.Gj = W, M, Gj
    if err is not None:
        state.error = err
    state.round = int(m["round"])
    if restore_rng:
        _restore_rng(tensors, m)
    return m


__all__ = [
    "FORMAT_VERSION", "DEFAULT_KEEP", "checkpoint_name", "list_checkpoints", "latest_checkpoint", "load",
    "check_config", "save_server", "load_server", "restore_server", "save_worker", "load_worker", "restore_worker",
]

"""Server and worker checkpoints: a msgpack manifest plus raw little-endian tensor buffers. No pickle.

Layout of a checkpoint directory DIR (one per run, or per worker):

    DIR/round-000007/manifest.msgpack    what is in the checkpoint (below)
    DIR/round-000007/tensors.bin         every tensor's raw little-endian bytes, concatenated
    DIR/LATEST                           one line: the name of the newest complete checkpoint

`manifest.msgpack` is a msgpack map ``{"efmuon_checkpoint": 1, "manifest": <bin>, "sha256": <hex>}``
whose `manifest` bytes are themselves a msgpack map and `sha256` is their digest, so a flipped
byte in the manifest is caught, not silently believed. The inner map holds the format version,
the kind ("server" / "worker"), the round, the run configuration (`RunConfig.to_dict()`), the
layer names and shapes, caller metadata (`extra`, per-client `clients`) and `tensors`: a list of
``{"name", "dtype", "shape", "offset", "nbytes", "sha256"}``, one per buffer in tensors.bin.

Tensor names. Server: ``X/i``, ``W/i``, ``G/i`` (layer i), ``G_j/j/i`` (client j's estimator),
``ef14/i`` (airbench error buffer); worker: ``W/i``, ``M/i``, ``Gj/i``, ``error/i``; both:
``rng/torch`` (torch.get_rng_state()), ``rng/numpy`` (numpy's global MT19937 key) and
``extra/NAME`` for caller tensors (e.g. a data sampler's torch.Generator state).

Writes are atomic: everything goes to ``DIR/.tmp-XXXX``, the files and the directory are
fsynced, the directory is renamed to ``round-NNNNNN``, then LATEST is replaced through a temp
file + fsync + rename. A crash at any point leaves LATEST naming the previous good checkpoint.
The newest `keep` checkpoints are kept, older ones deleted.

Reads check everything before allocating or changing state: the manifest's size and structure,
each buffer's offset/nbytes against the file size and its dtype x shape, the sha256 of every
buffer, and (in `restore_*`) the names, shapes and dtypes against the state being restored.
Problems raise `FrameError` (damaged files) or `ConfigError` (a checkpoint of another model or
configuration) with a message naming the file or tensor.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from .algorithm import params_sha256
from .config import RunConfig
from .errors import ConfigError, FrameError

FORMAT_VERSION = 1
MANIFEST = "manifest.msgpack"
TENSORS = "tensors.bin"
LATEST = "LATEST"
DEFAULT_KEEP = 3
MAX_MANIFEST_BYTES = 256 << 20  # a manifest is ~200 bytes per tensor; anything larger is not ours
_NAME_RE = re.compile(r"^round-(\d{6,})$")

# Fields of RunConfig that do not change the algorithm's arithmetic: a resumed run may differ in them.
EXECUTION_KEYS = frozenset({"device", "threads", "eval_every", "log_every", "report", "metrics", "plots"})

# torch dtype <-> (manifest name, little-endian numpy dtype used for the bytes)
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float64": (torch.float64, "<f8"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"),  # numpy has no bfloat16: its bits travel as int16
    "int64": (torch.int64, "<i8"),
    "int32": (torch.int32, "<i4"),
    "int16": (torch.int16, "<i2"),
    "int8": (torch.int8, "i1"),
    "uint8": (torch.uint8, "u1"),
    "bool": (torch.bool, "u1"),
}
_TORCH_TO_NAME = {t: name for name, (t, _) in _DTYPES.items()}


# --------------------------------------------------------------------------------------------
# tensors <-> bytes
# --------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    name = _TORCH_TO_NAME.get(t.dtype)
    if name is None:
        raise ConfigError(f"cannot checkpoint a tensor of dtype {t.dtype}; supported: {', '.join(_DTYPES)}")
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    arr = t.numpy()
    return name, arr.astype(np.dtype(_DTYPES[name][1]), copy=False).tobytes()


def _tensor_from_bytes(buf: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    tdtype, npdtype = _DTYPES[dtype]
    arr = np.frombuffer(buf, dtype=np.dtype(npdtype)).reshape(shape)
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=True)  # native order, writable, owns its memory
    t = torch.from_numpy(arr)
    if tdtype == torch.bfloat16:
        return t.view(torch.bfloat16)
    if tdtype == torch.bool:
        return t.to(torch.bool)
    return t


# --------------------------------------------------------------------------------------------
# filesystem helpers
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, chunks: Iterable[bytes]) -> None:
    with open(path, "wb") as fh:
        for c in chunks:
            fh.write(c)
        fh.flush()
        os.fsync(fh.fileno())


def _write_tensors(path: Path, buffers: list[bytes]) -> None:
    """Write tensors.bin (a seam the tests use to simulate a crash mid-write)."""
    _write_file(path, buffers)


def checkpoint_name(round_: int) -> str:
    return f"round-{int(round_):06d}"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints in `directory` as (round, path), oldest first."""
    d = Path(directory)
    out = []
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint LATEST names; without LATEST, the newest round-* directory; None if there is none."""
    d = Path(directory)
    latest = d / LATEST
    if latest.is_file():
        name = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not _NAME_RE.match(name):
            raise FrameError(f"{latest}: does not name a checkpoint (got {name[:80]!r}); expected e.g. 'round-000007'")
        target = d / name
        if not (target / MANIFEST).is_file():
            raise FrameError(f"{latest} names {name!r}, but {target / MANIFEST} does not exist")
        return target
    found = list_checkpoints(d)
    return found[-1][1] if found else None


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise FrameError(f"{p}: no checkpoint here (no {LATEST} file and no round-NNNNNN directory)")
        return found
    raise FrameError(f"checkpoint {p} does not exist")


def _publish(directory: Path, manifest: dict, buffers: list[bytes], round_: int, keep: int) -> Path:
    """Write one checkpoint atomically, point LATEST at it, prune to `keep`. Returns its path."""
    if keep < 1:
        raise ConfigError(f"keep={keep} must be >= 1 (the number of checkpoints to keep)")
    directory.mkdir(parents=True, exist_ok=True)
    body = msgpack.packb(manifest, use_bin_type=True)
    envelope = msgpack.packb({"efmuon_checkpoint": FORMAT_VERSION, "manifest": body,
                              "sha256": hashlib.sha256(body).hexdigest()}, use_bin_type=True)
    name = checkpoint_name(round_)
    final = directory / name
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        _write_tensors(tmp / TENSORS, buffers)
        _write_file(tmp / MANIFEST, [envelope])
        _fsync_dir(tmp)
        if final.exists():  # the same round saved again: move the old one aside, then replace it
            old = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=directory))
            os.rename(final, old / name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd, ltmp = tempfile.mkstemp(prefix=".tmp-LATEST-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(ltmp, directory / LATEST)
    except BaseException:
        try:
            os.unlink(ltmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    _prune(directory, keep, name)
    return final


def _prune(directory: Path, keep: int, current: str) -> None:
    found = list_checkpoints(directory)
    for _, p in found[:-keep] if len(found) > keep else []:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)
    # temp directories of interrupted writes (one writer per directory is the contract)
    for p in directory.iterdir():
        if p.name.startswith(".tmp-"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass


# --------------------------------------------------------------------------------------------
# manifest building / reading
# --------------------------------------------------------------------------------------------


def _packable(value: Any, what: str) -> Any:
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"checkpoint {what} must hold only msgpack types (dict, list, str, int, float, "
                          f"bool, None, bytes): {exc}") from None
    return value


class _Writer:
    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.buffers: list[bytes] = []
        self.offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        dtype, buf = _tensor_bytes(t)
        self.entries.append({"name": name, "dtype": dtype, "shape": [int(s) for s in t.shape],
                             "offset": self.offset, "nbytes": len(buf),
                             "sha256": hashlib.sha256(buf).hexdigest()})
        self.buffers.append(buf)
        self.offset += len(buf)


def _add_rng(w: _Writer, manifest: dict) -> None:
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
        "config": _packable(cfg_dict, "config"),
        "layers": [{"name": s.name, "shape": list(s.shape), "norm": s.norm} for s in specs],
        "extra": _packable(dict(extra or {}), "extra"),
    }


def _read_manifest(ckpt: Path) -> dict:
    path = ckpt / MANIFEST
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FrameError(f"checkpoint {ckpt}: {MANIFEST} is missing (an incomplete or foreign directory)") from None
    if size > MAX_MANIFEST_BYTES:
        raise FrameError(f"{path}: {size} bytes is larger than any efmuon manifest ({MAX_MANIFEST_BYTES}); not a checkpoint")
    raw = path.read_bytes()
    try:
        env = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise FrameError(f"{path}: corrupt manifest (not valid msgpack: {exc})") from None
    if not isinstance(env, dict) or "manifest" not in env or "sha256" not in env:
        raise FrameError(f"{path}: not an efmuon checkpoint manifest (missing 'manifest'/'sha256')")
    if env.get("efmuon_checkpoint") != FORMAT_VERSION:
        raise FrameError(f"{path}: checkpoint format {env.get('efmuon_checkpoint')!r}; this efmuon reads "
                         f"format {FORMAT_VERSION}")
    body = env["manifest"]
    if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != env["sha256"]:
        raise FrameError(f"{path}: corrupt manifest (its sha256 does not match: the file was damaged)")
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise FrameError(f"{path}: corrupt manifest body ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != "efmuon-checkpoint":
        raise FrameError(f"{path}: not an efmuon checkpoint manifest")
    if m.get("version") != FORMAT_VERSION:
        raise FrameError(f"{path}: checkpoint version {m.get('version')!r}; this efmuon reads version {FORMAT_VERSION}")
    for key, typ in (("kind", str), ("round", int), ("tensors", list), ("layers", list), ("extra", dict)):
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            raise FrameError(f"{path}: manifest field {key!r} is missing or not a {typ.__name__}")
    return m


def _check_entries(path: Path, entries: list, file_size: int) -> list[dict]:
    """Validate every tensor entry against the format and the file size, before reading anything."""
    seen: set[str] = set()
    spans = []
    for n, e in enumerate(entries):
        if not isinstance(e, dict):
            raise FrameError(f"{path}: tensor entry {n} is not a map")
        name, dtype, shape = e.get("name"), e.get("dtype"), e.get("shape")
        offset, nbytes, digest = e.get("offset"), e.get("nbytes"), e.get("sha256")
        if not isinstance(name, str) or not name or name in seen:
            raise FrameError(f"{path}: tensor entry {n} has a missing or duplicate name {name!r}")
        seen.add(name)
        if dtype not in _DTYPES:
            raise FrameError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 40 for s in shape)):
            raise FrameError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        for field_, v in (("offset", offset), ("nbytes", nbytes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FrameError(f"{path}: tensor {name!r} has an invalid {field_} {v!r}")
        itemsize = np.dtype(_DTYPES[dtype][1]).itemsize
        if math.prod(shape) * itemsize != nbytes:
            raise FrameError(f"{path}: tensor {name!r}: shape {tuple(shape)} of {dtype} is "
                             f"{math.prod(shape) * itemsize} bytes, the manifest says {nbytes}")
        if offset + nbytes > file_size:
            raise FrameError(f"{path.parent / TENSORS}: truncated: tensor {name!r} needs bytes "
                             f"{offset}..{offset + nbytes}, the file has {file_size}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise FrameError(f"{path}: tensor {name!r} has no valid sha256")
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise FrameError(f"{path}: tensors {an!r} and {bn!r} overlap in {TENSORS}")
    return entries


def load(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint: a checkpoint directory, or a DIR holding LATEST / round-* dirs.

    Returns ``(tensors, manifest)``; `manifest["path"]` is the checkpoint directory read.
    """
    ckpt = _resolve(path)
    m = _read_manifest(ckpt)
    if kind is not None and m["kind"] != kind:
        raise ConfigError(f"{ckpt} is a {m['kind']} checkpoint, not a {kind} checkpoint")
    bin_path = ckpt / TENSORS
    tensors: dict[str, torch.Tensor] = {}
    try:
        fh = open(bin_path, "rb")
    except FileNotFoundError:
        raise FrameError(f"checkpoint {ckpt}: {TENSORS} is missing") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        entries = _check_entries(ckpt / MANIFEST, m["tensors"], size)
        for e in entries:
            fh.seek(e["offset"])
            buf = fh.read(e["nbytes"])
            if len(buf) != e["nbytes"]:
                raise FrameError(f"{bin_path}: truncated while reading tensor {e['name']!r}")
            if hashlib.sha256(buf).hexdigest() != e["sha256"]:
                raise FrameError(f"{bin_path}: tensor {e['name']!r} is corrupt (sha256 mismatch): the file was damaged")
            tensors[e["name"]] = _tensor_from_bytes(buf, e["dtype"], tuple(e["shape"]))
    m["path"] = str(ckpt)
    return tensors, m


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
    w = _Writer()
    m = _base_manifest("server", state.round, cfg, state.specs, extra)
    m["n_clients"] = int(state.n)
    m["stale_nuclear"] = None if state.stale_nuclear is None else float(state.stale_nuclear)
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
    m["clients"] = [[int(j), _packable(dict(v), f"clients[{j}]")] for j, v in sorted((clients or {}).items())]
    for name, t in (extra_tensors or {}).items():
        w.add(f"extra/{name}", t)
    _add_rng(w, m)
    m["tensors"] = w.entries
    return _publish(Path(directory), m, w.buffers, state.round, keep)


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
    """Put a loaded server checkpoint into `state` (X, W, G, estimators, round, stale_nuclear, ef14 buffer).

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
    sn = m.get("stale_nuclear")
    if sn is not None and not isinstance(sn, (int, float)):
        raise FrameError(f"{where}: stale_nuclear {sn!r} is not a number")
    # all checked: commit
    state.X, state.W, state.G = X, W, G
    if est is not None:
        state.estimators = est
    if buf is not None:
        state.ef14_buffer = buf
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
    w = _Writer()
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
    return _publish(Path(directory), m, w.buffers, state.round, keep)


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

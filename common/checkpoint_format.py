"""The checkpoint file format: a msgpack manifest plus raw little-endian tensor buffers. No pickle.

Layout of a checkpoint directory DIR (one per run, or per worker):

    DIR/round-000007/manifest.msgpack    what is in the checkpoint (below)
    DIR/round-000007/tensors.bin         every tensor's raw little-endian bytes, concatenated
    DIR/LATEST                           one line: the name of the newest complete checkpoint

`manifest.msgpack` is a msgpack map ``{"efmuon_checkpoint": 1, "manifest": <bin>, "sha256": <hex>}``
whose `manifest` bytes are themselves a msgpack map and `sha256` is their digest, so a flipped
byte in the manifest is caught, not silently believed. The inner map holds at least the format
name and version, the kind, the round, the layers and ``tensors``: a list of ``{"name", "dtype",
"shape", "offset", "nbytes", "sha256"}``, one per buffer in tensors.bin (what else a server or a
worker checkpoint holds is `efmuon.common.checkpoint`).

Writes are atomic (`publish`): everything goes to ``DIR/.tmp-XXXX``, the files and the directory
are fsynced, the directory is renamed to ``round-NNNNNN``, then LATEST is replaced through a temp
file + fsync + rename. A crash at any point leaves LATEST naming the previous good checkpoint.
The newest `keep` checkpoints are kept, older ones deleted.

Reads (`load`) check everything before allocating: the manifest's size and structure, each
buffer's offset/nbytes against the file size and its dtype x shape, and the sha256 of every
buffer. Problems raise `FrameError` (damaged files) or `ConfigError` with a message naming the
file or tensor.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from .errors import ConfigError, FrameError

FORMAT_VERSION = 1
MANIFEST = "manifest.msgpack"
TENSORS = "tensors.bin"
LATEST = "LATEST"
DEFAULT_KEEP = 3
MAX_MANIFEST_BYTES = 256 << 20  # a manifest is ~200 bytes per tensor; anything larger is not ours
_NAME_RE = re.compile(r"^round-(\d{6,})$")

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


def write_file(path: Path, chunks: Iterable[bytes]) -> None:
    with open(path, "wb") as fh:
        for c in chunks:
            fh.write(c)
        fh.flush()
        os.fsync(fh.fileno())


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


def publish(directory: Path, manifest: dict, buffers: list[bytes], round_: int, keep: int, *,
            write_tensors: Callable[[Path, list[bytes]], None] = write_file) -> Path:
    """Write one checkpoint atomically, point LATEST at it, prune to `keep`. Returns its path.

    `write_tensors(path, buffers)` writes tensors.bin (the caller's seam for crash tests)."""
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
        write_tensors(tmp / TENSORS, buffers)
        write_file(tmp / MANIFEST, [envelope])
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
# manifest writing / reading
# --------------------------------------------------------------------------------------------


def packable(value: Any, what: str) -> Any:
    """`value` itself, once it is known to be msgpack-able (else a ConfigError naming `what`)."""
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"checkpoint {what} must hold only msgpack types (dict, list, str, int, float, "
                          f"bool, None, bytes): {exc}") from None
    return value


class TensorWriter:
    """The tensors of one checkpoint: their manifest entries and their bytes, laid out back to back."""

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


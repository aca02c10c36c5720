"""How the server behaves around the algorithm (`ServerOptions`, the `efmuon server` flags) and its limits.

The uplink's validation limits are the algorithm's own (`common.algorithm`: MAX_ABS_VALUE and the
NaN policies), re-exported here because the options name them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..common.algorithm import MAX_ABS_VALUE, NAN_POLICIES
from ..common.checkpoint_format import LATEST, list_checkpoints
from ..common.errors import ConfigError
from ..common.shards import parse_shard
from ..common.wire import protocol
from .estimators import MODES as ESTIMATOR_MODES

LEAVE_TIMEOUT = 30.0  # seconds to wait for the clients' Leave after the last round
MAX_NAME_BYTES = 256  # a client name at most (and a Leave reason at most 4x this)
ON_DEADLINE = ("fail", "proceed")

__all__ = ["LEAVE_TIMEOUT", "MAX_ABS_VALUE", "MAX_NAME_BYTES", "NAN_POLICIES", "ON_DEADLINE", "ServerOptions"]


@dataclass
class ServerOptions:
    """How the server behaves around the algorithm (not part of the run configuration)."""

    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # rounds between checkpoints; 0: only at the end and at shutdown
    checkpoint_keep: int = 3
    round_deadline: float | None = 600.0  # seconds a round waits for every client; None: forever
    on_deadline: str = "fail"  # fail | proceed
    nan_policy: str = "reject"  # reject | zero
    max_clients: int = 1024  # live sessions at most (and --workers at most)
    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    estimators: str = "fp32"  # fp32 | bf16 | disk
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    token_file: str | None = None
    save_model: str | None = None  # write W here (safetensors, common.export) when the run has finished
    metrics_port: int | None = None  # serve Prometheus metrics on this port (0: any free one); None: off
    min_cohort: int = 1  # cohort runs: a round needs this many eligible clients (server.cohorts)
    client_timeout: float | None = None  # cohort runs: a member silent this long is not sampled (None: 60 s)
    shard: str | None = None  # 'I/N': this server holds shard I of N of the layers (docs/design.md §6.3)
    pipeline: bool = False  # step LMO units while the uplinks stream in (server.pipelined); same bits

    def validate(self) -> "ServerOptions":
        if self.on_deadline not in ON_DEADLINE:
            raise ConfigError(f"--on-deadline {self.on_deadline!r}; choose one of: {', '.join(ON_DEADLINE)}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"--nan-policy {self.nan_policy!r}; choose one of: {', '.join(NAN_POLICIES)}")
        if self.estimators not in ESTIMATOR_MODES:
            raise ConfigError(f"--estimators {self.estimators!r}; choose one of: {', '.join(ESTIMATOR_MODES)}")
        if self.estimators == "disk" and not self.checkpoint_dir:
            raise ConfigError("--estimators disk spills to files under --checkpoint-dir DIR: give one")
        if not (isinstance(self.min_cohort, int) and self.min_cohort >= 1):
            raise ConfigError(f"--min-cohort {self.min_cohort!r} must be an integer >= 1")
        if self.client_timeout is not None and not (self.client_timeout > 0 and math.isfinite(self.client_timeout)):
            raise ConfigError(f"--client-timeout {self.client_timeout!r} must be > 0 seconds")
        if self.round_deadline is not None and not (self.round_deadline > 0 and math.isfinite(self.round_deadline)):
            raise ConfigError(f"--round-deadline {self.round_deadline!r} must be > 0 seconds")
        if self.checkpoint_every < 0 or self.checkpoint_keep < 1:
            raise ConfigError("--checkpoint-every must be >= 0 and the number of checkpoints kept >= 1")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError("--checkpoint-every needs --checkpoint-dir DIR")
        if self.max_clients < 1:
            raise ConfigError(f"--max-clients {self.max_clients} must be >= 1")
        if not (1 << 20) + 4096 <= self.max_message_bytes <= (1 << 31) - 1:
            raise ConfigError(f"--max-message-bytes {self.max_message_bytes} must be in [1 MiB + 4 KiB, 2 GiB): "
                              "a chunk message is up to 1 MiB plus a few bytes")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both --tls-cert and --tls-key (the server's certificate and key), or neither")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key as well")
        if self.shard is not None:
            parse_shard(self.shard)
            if self.save_model:
                raise ConfigError("--save-model with --shard would write only this shard's layers: leave it out; each "
                                  "shard writes REPORT.layers.safetensors (its W and X) beside its --report, and "
                                  "`efmuon report merge` puts the whole model's hashes and losses in one report")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port} is not a TCP port: give 0..65535 (0: any free port)")
        return self


# ------------------------------------------------------------------ what a resumed run keeps
# Every option that shapes the run is stored in its checkpoints (`to_state`) and comes back on --resume
# (`resumed`) unless a flag gives it again: a resumed server checkpoints as often, waits as long, refuses
# the same values and serves with the same security as the run it continues.
RESUMED_FIELDS = ("checkpoint_every", "checkpoint_keep", "round_deadline", "on_deadline", "nan_policy", "min_cohort",
                  "client_timeout",
                  "max_clients", "max_message_bytes", "estimators", "shard")
# Security settings are stored as paths and the sha256 of the files' contents, never the secrets.
SECURITY_FIELDS = ("tls_cert", "tls_key", "tls_ca", "token_file")
_FLAG = {f: "--" + f.replace("_", "-") for f in RESUMED_FIELDS + SECURITY_FIELDS}


def file_sha256(path: str) -> str | None:
    """sha256 of a file's contents; None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def options_state(opts: ServerOptions) -> dict:
    """What a checkpoint keeps of the server's options (see RESUMED_FIELDS, SECURITY_FIELDS)."""
    security = {}
    for f in SECURITY_FIELDS:
        path = getattr(opts, f)
        if path is not None:
            security[f] = {"path": os.path.abspath(path), "sha256": file_sha256(path)}
    return {"options": {f: getattr(opts, f) for f in RESUMED_FIELDS}, "security": security}


def resumed_options(opts: ServerOptions, state: dict | None, explicit: set[str], where: str) -> ServerOptions:
    """`opts` (from the flags) completed by a checkpoint's `state` (`options_state`): every option in
    RESUMED_FIELDS the flags did not give (`explicit`: field names) takes the run's stored value, and every
    security file the run was served with is used again if it is unchanged (same sha256). A stored security
    file that is missing or changed, with no flag to replace it, is refused: a resumed run never serves with
    less protection than the run it continues (no TLS, no tokens) without saying so."""
    if not state:  # a checkpoint from before options were stored: the flags alone, as before
        return opts
    changes = {f: v for f, v in (state.get("options") or {}).items() if f in RESUMED_FIELDS and f not in explicit}
    for f, saved in (state.get("security") or {}).items():
        if f not in SECURITY_FIELDS or f in explicit:
            continue
        path, digest = saved.get("path"), saved.get("sha256")
        now = file_sha256(path) if path else None
        if now is None or now != digest:
            what = "is missing or unreadable" if now is None else "has changed since the run was checkpointed"
            raise ConfigError(f"the run in {where} was served with {_FLAG[f]} {path}, which {what}; give "
                              f"{_FLAG[f]} FILE again (with the other security flags of that run) to resume it")
        changes[f] = path
    return dataclasses.replace(opts, **changes).validate()


def check_checkpoint_dir(directory: str | None, resuming: bool, fresh: bool) -> None:
    """A new run (no --resume) never starts over silently in a directory that holds another run's
    checkpoints: refuse, naming --resume and --fresh; with --fresh, remove them first (and the local
    workers' ones under DIR/worker-J) so that the new run's checkpoints are the only ones there."""
    if directory is None or resuming:
        return
    root = Path(directory)
    found = list_checkpoints(root)
    if not found:
        return
    if not fresh:
        raise ConfigError(f"{directory} holds the checkpoints of an earlier run (newest {found[-1][1].name}); "
                          f"continue it with --resume {directory}, or start over with --fresh (which deletes "
                          "them)")
    for sub in [root, *sorted(root.glob("worker-*"))]:
        for _, p in list_checkpoints(sub):
            shutil.rmtree(p)
        (sub / LATEST).unlink(missing_ok=True)

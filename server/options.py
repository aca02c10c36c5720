"""How the server behaves around the algorithm (`ServerOptions`, the `efmuon server` flags) and its limits.

The uplink's validation limits are the algorithm's own (`common.algorithm`: MAX_ABS_VALUE and the
NaN policies), re-exported here because the options name them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..common.algorithm import MAX_ABS_VALUE, NAN_POLICIES
from ..common.errors import ConfigError
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

    def validate(self) -> "ServerOptions":
        if self.on_deadline not in ON_DEADLINE:
            raise ConfigError(f"--on-deadline {self.on_deadline!r}; choose one of: {', '.join(ON_DEADLINE)}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"--nan-policy {self.nan_policy!r}; choose one of: {', '.join(NAN_POLICIES)}")
        if self.estimators not in ESTIMATOR_MODES:
            raise ConfigError(f"--estimators {self.estimators!r}; choose one of: {', '.join(ESTIMATOR_MODES)}")
        if self.estimators == "disk" and not self.checkpoint_dir:
            raise ConfigError("--estimators disk spills to files under --checkpoint-dir DIR: give one")
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
        return self

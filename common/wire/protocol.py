"""What both ends of proto/efmuon/v1/service.proto agree on, as plain values and functions.

The protocol version, chunk size and message limits, the gRPC channel options, the model fingerprint
(name, shape, dtype per parameter) and its comparison, and the run-config codec (msgpack). Only this
layer, the servicer and the worker's stub touch `_pb2`. Chunking is `chunking`; credentials (TLS files,
bearer tokens) are `credentials`; raw float32 frames (the initial W of Join, a re-sync's W and G_j) are
`raw`. No torch here: a worker reaches its server (and fails fast on a mistake) before loading it.
"""
from __future__ import annotations

from collections.abc import Sequence

from typing import TYPE_CHECKING

import msgpack

from ...v1 import service_pb2 as pb
from ..config import RunConfig, from_mapping
from ..errors import ProtocolError

if TYPE_CHECKING:
    import torch

PROTOCOL_VERSION = pb.PROTOCOL_VERSION_CURRENT  # 1


CHUNK_BYTES = 1 << 20  # payload bytes per chunk message (1 MiB)


# Explicit limits on both ends: a chunk message is ~1 MiB, so 64 MiB only stops runaway peers
# (and leaves room for the Join header of a model with very many parameters).
MAX_MESSAGE_BYTES = 64 << 20


GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


# Keepalive. The client pings every KEEPALIVE_TIME_S without data from the server (also between
# calls, and with no limit on pings without data), so an answering server sends something at least
# that often; the server accepts pings SERVER_MIN_PING_INTERVAL_S apart (a peer pinging more often
# is sent GOAWAY after gRPC's default 2 strikes) and pings its clients itself, less often, to drop
# the connections of workers that vanished. A ping not acknowledged within PING_TIMEOUT_S drops the
# connection. That timeout stays gRPC's default of 60 s: on a slow link an acknowledgement waits
# behind the megabytes queued in the other direction, and gRPC applies it to its flow-control (BDP)
# pings too. The worker notices a silent server sooner through its relay (`worker.silence`).
KEEPALIVE_TIME_S = 10.0
PING_TIMEOUT_S = 60.0
SERVER_KEEPALIVE_TIME_S = 30.0
SERVER_MIN_PING_INTERVAL_S = KEEPALIVE_TIME_S / 2


CLIENT_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(PING_TIMEOUT_S * 1000)),
    ("grpc.http2.ping_timeout_ms", int(PING_TIMEOUT_S * 1000)),  # what gRPC 1.85 times keepalive pings by
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", int(SERVER_KEEPALIVE_TIME_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(PING_TIMEOUT_S * 1000)),
    ("grpc.http2.ping_timeout_ms", int(PING_TIMEOUT_S * 1000)),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", int(SERVER_MIN_PING_INTERVAL_S * 1000)),
]


# Reconnect quickly after a server restart (gRPC's default backoff grows to 120 s). Each channel has
# its own TCP connection (a local subchannel pool): gRPC would otherwise share one among the channels
# of a process with the same target and options, and the server counts wire bytes per connection.
CHANNEL_OPTIONS = GRPC_OPTIONS + CLIENT_KEEPALIVE_OPTIONS + [
    ("grpc.enable_http_proxy", 0), ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.use_local_subchannel_pool", 1)]


# ---------------------------------------------------------------------------- fingerprint
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fingerprint(names: Sequence[str], params: Sequence[torch.Tensor]) -> list[pb.ParameterInfo]:
    """The model's parameters as the wire describes them: name, shape, dtype, in order."""
    return [pb.ParameterInfo(name=n, shape=list(p.shape), dtype=dtype_name(p.dtype)) for n, p in zip(names, params)]


def fingerprint_mismatch(here: Sequence[pb.ParameterInfo], server: Sequence[pb.ParameterInfo]) -> str | None:
    """Why the client's model (`here`) is not the server's, or None when they match."""
    for i, (a, b) in enumerate(zip(here, server)):
        if a.name != b.name:
            return f"parameter #{i} is {a.name!r} here but {b.name!r} on the server"
        if tuple(a.shape) != tuple(b.shape):
            return f"parameter {a.name!r} has shape {tuple(a.shape)} here but {tuple(b.shape)} on the server"
        if a.dtype != b.dtype:
            return f"parameter {a.name!r} has dtype {a.dtype} here but {b.dtype} on the server"
    if len(here) != len(server):
        longer, where = (here, "here") if len(here) > len(server) else (server, "on the server")
        extra = longer[min(len(here), len(server))].name
        return (f"the model has {len(here)} parameters here but {len(server)} on the server "
                f"(first extra one {where}: {extra!r})")
    return None


# ---------------------------------------------------------------------------- run config
def encode_config(cfg: RunConfig) -> bytes:
    return msgpack.packb(cfg.to_dict(), use_bin_type=True)


def decode_config(data: bytes) -> RunConfig:
    """The server's RunConfig; validated like a config file (unknown keys are an error)."""
    try:
        mapping = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several types
        raise ProtocolError(f"the run configuration from the server is not valid msgpack: {exc}") from None
    if not isinstance(mapping, dict):
        raise ProtocolError("the run configuration from the server is not a map")
    return from_mapping(mapping, RunConfig(), where="server config")

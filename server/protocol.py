"""What both ends of proto/efmuon/v1/service.proto agree on, as plain functions.

Constants (protocol version, chunk size, message limits), the model fingerprint and its
comparison, the run-config codec, cutting frames into <= 1 MiB chunk messages and back, and the
client stub that sends and reads those messages without extra copies. The server's servicer and the
worker's client are the only other modules that touch `_pb2`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import msgpack
import numpy as np
import torch

from efmuon.common.config import RunConfig, from_mapping
from efmuon.common.errors import FrameError, ProtocolError
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc

PROTOCOL_VERSION = pb.PROTOCOL_VERSION_CURRENT  # 1
CHUNK_BYTES = 1 << 20  # payload bytes per chunk message (1 MiB)
# Explicit limits on both ends: a chunk message is ~1 MiB, so 64 MiB only stops runaway peers
# (and leaves room for the Join header of a model with very many parameters).
MAX_MESSAGE_BYTES = 64 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Reconnect quickly after a server restart (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = GRPC_OPTIONS + [("grpc.enable_http_proxy", 0), ("grpc.initial_reconnect_backoff_ms", 200),
                                  ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


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


# ---------------------------------------------------------------------------- chunks
def varint_size(value: int) -> int:
    """Bytes of `value` (>= 0) as a protobuf varint."""
    n = 1
    while value >= 0x80:
        value >>= 7
        n += 1
    return n


def _varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _chunk_tag(cls) -> int:
    """The key of `cls`'s `chunk` field: field number, wire type 2 (length-delimited)."""
    return cls.DESCRIPTOR.fields_by_name["chunk"].number << 3 | 2


def _chunk_tag_size(cls) -> int:
    return varint_size(_chunk_tag(cls))


_CHUNK_TAG = {cls: _chunk_tag_size(cls) for cls in (pb.JoinReply, pb.Submission, pb.Downlink)}


def chunk_message_size(cls, n: int) -> int:
    """`cls(chunk=<n bytes>).ByteSize()` without serialising the message: tag + varint(n) + n (the
    chunk is the only field set; a oneof member is serialised even when empty)."""
    tag = _CHUNK_TAG.get(cls)
    if tag is None:
        tag = _CHUNK_TAG[cls] = _chunk_tag_size(cls)
    return tag + varint_size(n) + n


try:
    from google.protobuf.unknown_fields import UnknownFieldSet as _UnknownFieldSet
except ImportError:  # an older protobuf: always measure by serialising
    _UnknownFieldSet = None


def received_chunk_size(msg, n: int) -> int:
    """`msg.ByteSize()` of a received message whose `chunk` (n bytes) is its only known field set,
    without re-serialising 1 MiB: arithmetic, unless the peer sent unknown fields (then ByteSize)."""
    if isinstance(msg, ReceivedChunk):
        return msg.size
    if _UnknownFieldSet is None or len(_UnknownFieldSet(msg)):
        return msg.ByteSize()
    return chunk_message_size(type(msg), n)


class ReceivedChunk:
    """A received message whose serialized form is exactly one `chunk` field (tag, varint length,
    bytes): `chunk` is a read-only memoryview into the bytes gRPC handed over, so nothing is copied
    or parsed. Duck-types the two things a receiver asks of the message (`WhichOneof`, `ByteSize`)."""

    __slots__ = ("chunk", "size")

    def __init__(self, chunk: memoryview, size: int):
        self.chunk, self.size = chunk, size

    def WhichOneof(self, _oneof: str) -> str:  # noqa: N802 - the message API
        return "chunk"

    def ByteSize(self) -> int:  # noqa: N802
        return self.size


def chunk_deserializer(cls, parse):
    """A gRPC deserializer for `cls` messages (the server's Exchange requests, the worker's Join and
    Exchange replies): a message that is exactly one `chunk` field becomes a `ReceivedChunk` viewing
    the received bytes (protobuf would copy the MiB into its arena and again on every `.chunk` read);
    anything else goes to `parse(data)`. Both readings agree: a
    message whose bytes are one chunk field parses to that chunk, and nothing else matches."""
    tag = _chunk_tag(cls)
    if tag >= 0x80:
        raise ValueError("chunk_deserializer needs a one-byte chunk tag")

    def deserialize(data: bytes):
        if len(data) >= 2 and data[0] == tag:
            length, shift, pos = 0, 0, 1
            while pos < len(data) and pos <= 10:  # a varint of at most 10 bytes
                b = data[pos]
                length |= (b & 0x7F) << shift
                pos += 1
                if b < 0x80:
                    if pos + length == len(data):
                        return ReceivedChunk(memoryview(data)[pos:], len(data))
                    break
                shift += 7
        return parse(data)
    return deserialize


def submission_messages(header: pb.SubmissionHeader, frames: Iterable, sizes: list) -> Iterator[pb.Submission | bytes]:
    """The Exchange request stream: the header message (a pb.Submission), then the frames as chunk
    messages already serialized (`iter_chunk_messages`; the stub of `client_stub` sends them as they are).

    Appends each message's serialized size to `sizes` (the `message` byte level): for the chunk
    messages that is their length, so nothing is serialized a second time."""
    first = pb.Submission(header=header)
    sizes.append(first.ByteSize())
    yield first
    for message in iter_chunk_messages(frames, pb.Submission):
        sizes.append(len(message))
        yield message


def iter_chunk_messages(frames: Iterable, cls=pb.Submission, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """`cls(chunk=c).SerializeToString()` for each chunk c of `iter_chunks(frames, size)`, built by one
    join of the field's tag and length with memoryviews of the frames: one copy of the payload, where
    `bytes(...)` + `cls(chunk=)` + `SerializeToString` make four (BENCHMARKS.md, transport)."""
    tag = _varint(_chunk_tag(cls))
    for pieces, n in _chunk_pieces(frames, size):
        yield b"".join([tag, _varint(n), *pieces])


def submission_serializer(message: pb.Submission | bytes) -> bytes:
    """Exchange's request serializer: a chunk message from `iter_chunk_messages` is already bytes."""
    return message if type(message) is bytes else message.SerializeToString()


def client_stub(channel) -> pb_grpc.ParameterServerStub:
    """The generated stub, except that Exchange sends `submission_messages` as they are
    (`submission_serializer`) and the replies of Join and Exchange are read by `chunk_deserializer`:
    their chunks are read-only memoryviews of gRPC's bytes, not copies. Any other reply is parsed by
    protobuf as before, so one it cannot parse fails the call the same way (gRPC's INTERNAL
    "Exception deserializing response")."""
    stub = pb_grpc.ParameterServerStub(channel)
    stub.Join = channel.unary_stream(
        "/efmuon.v1.ParameterServer/Join", request_serializer=pb.JoinRequest.SerializeToString,
        response_deserializer=chunk_deserializer(pb.JoinReply, pb.JoinReply.FromString), _registered_method=True)
    stub.Exchange = channel.stream_stream(
        "/efmuon.v1.ParameterServer/Exchange", request_serializer=submission_serializer,
        response_deserializer=chunk_deserializer(pb.Downlink, pb.Downlink.FromString), _registered_method=True)
    return stub


def _chunk_pieces(frames: Iterable, size: int) -> Iterator[tuple[list[memoryview], int]]:
    """The concatenation of `frames` cut into chunks of exactly `size` bytes (the last may be shorter),
    each as (views of the frames that make it up, its length): nothing is copied here."""
    pieces: list[memoryview] = []
    have = 0
    for f in frames:
        mv = memoryview(f).cast("B")
        pos, n = 0, len(mv)
        while pos < n:
            take = min(size - have, n - pos)
            pieces.append(mv[pos:pos + take])
            pos += take
            have += take
            if have == size:
                yield pieces, have
                pieces, have = [], 0
    if have:
        yield pieces, have


def iter_chunks(frames: Iterable, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The concatenation of `frames` cut into pieces of exactly `size` bytes (the last may be shorter)."""
    for pieces, _ in _chunk_pieces(frames, size):
        yield b"".join(pieces)


class Reassembler:
    """Collects `chunk` messages and cuts them back into frames of the announced lengths."""

    def __init__(self, frame_lengths: Sequence[int], expected_frames: Sequence[int] | int | None = None,
                 limit: int | None = None):
        self.lengths = [int(n) for n in frame_lengths]
        if expected_frames is not None:
            allowed = (expected_frames,) if isinstance(expected_frames, int) else tuple(expected_frames)
            if len(self.lengths) not in allowed:
                raise FrameError(f"expected {' or '.join(map(str, allowed))} layer frames, "
                                 f"the header announces {len(self.lengths)}")
        self.total = sum(self.lengths)
        if limit is not None and self.total > limit:
            raise FrameError(f"the header announces {self.total} bytes of frames, more than the {limit} "
                             f"any compressor produces for this model")
        # One buffer per frame of its announced size, allocated when its first byte arrives and filled
        # in place: no regrowth, and numpy's allocation is neither zero-filled nor faulted in 4 KiB
        # pages (it asks for huge pages), ~3x faster than `bytearray +=` for large frames (BENCHMARKS.md,
        # transport). Separate buffers let a consumer free each frame as soon as it is decoded.
        self.received = 0
        self._bufs: list[np.ndarray | bytearray | None] = [None] * len(self.lengths)
        self._fi, self._fo = 0, 0  # the frame being filled and the bytes it already has

    def add(self, chunk: bytes) -> None:
        n = len(chunk)
        if self.received + n > self.total:
            raise FrameError(f"received more than the {self.total} frame bytes the header announced")
        if not n:
            return
        src = np.frombuffer(chunk, dtype=np.uint8)
        pos = 0
        while pos < n:
            need = self.lengths[self._fi] - self._fo
            if need == 0:  # frame complete (or empty): the next one
                self._fi, self._fo = self._fi + 1, 0
                continue
            buf = self._bufs[self._fi]
            if buf is None:
                try:
                    buf = np.empty(self.lengths[self._fi], dtype=np.uint8)
                except (MemoryError, ValueError):  # a size this machine cannot map: grow as bytes arrive
                    buf = bytearray()
                self._bufs[self._fi] = buf
            take = min(need, n - pos)
            if isinstance(buf, bytearray):
                buf += chunk[pos:pos + take]
            else:
                buf[self._fo:self._fo + take] = src[pos:pos + take]
            pos += take
            self._fo += take
        self.received += n

    def frames(self) -> list[memoryview]:
        """The frames, as writable memoryviews of their own buffers."""
        if self.received != self.total:
            raise FrameError(f"received {self.received} frame bytes, the header announced {self.total}")
        return [memoryview(b if b is not None else bytearray()) for b in self._bufs]


def raw_frames(params: Sequence[torch.Tensor]) -> list[bytes]:
    """Raw float32 little-endian bytes of each tensor (the initial W at Join)."""
    return [p.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy().tobytes() for p in params]


def tensors_from_raw(frames: Sequence, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    out = []
    for f, shape in zip(frames, shapes):
        n = 1
        for s in shape:
            n *= int(s)
        if len(f) != 4 * n:
            raise FrameError(f"initial W frame of shape {tuple(shape)} has {len(f)} bytes, expected {4 * n}")
        buf = f if isinstance(f, memoryview) and not f.readonly else bytearray(f)
        t = torch.frombuffer(buf, dtype=torch.float32) if n else torch.zeros(0)
        out.append(t.reshape(tuple(int(s) for s in shape)))
    return out

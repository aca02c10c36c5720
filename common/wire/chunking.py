"""Frames cut into <= 1 MiB `chunk` messages and put back together, without extra copies.

Sizes of chunk messages computed arithmetically (the `message` byte level), chunk messages serialized by
one join of tag, length and views of the frames, a deserializer that hands received chunks over as
read-only views of gRPC's bytes (`ReceivedChunk`), and the `Reassembler` that cuts a stream of chunks
back into the frames its header announced. Both ends use it: the server for uplinks, the worker for
Join and downlink replies.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ...v1 import service_pb2 as pb
from ..errors import FrameError
from .protocol import CHUNK_BYTES

# ---------------------------------------------------------------------------- chunks
try:
    from google.protobuf.unknown_fields import UnknownFieldSet as _UnknownFieldSet
except ImportError:  # an older protobuf: always measure by serialising
    _UnknownFieldSet = None


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


def iter_chunk_messages(frames: Iterable, cls=pb.Submission, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """`cls(chunk=c).SerializeToString()` for each chunk c of `iter_chunks(frames, size)`, built by one
    join of the field's tag and length with memoryviews of the frames: one copy of the payload, where
    `bytes(...)` + `cls(chunk=)` + `SerializeToString` make four (BENCHMARKS.md, transport)."""
    tag = _varint(_chunk_tag(cls))
    for pieces, n in _chunk_pieces(frames, size):
        yield b"".join([tag, _varint(n), *pieces])


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


def stream_order(frame_order: Sequence[int], n: int) -> list[int] | None:
    """SubmissionHeader.frame_order checked against the `n` frames announced: the layer of each frame in
    stream order, or None for layer order (empty). A FrameError says what is wrong otherwise."""
    order = [int(i) for i in frame_order]
    if not order:
        return None
    if len(order) != n:
        raise FrameError(f"frame_order lists {len(order)} layers, the header announces {n} frames: give one "
                         "layer index per frame, or none for layer order")
    bad = sorted({i for i in order if not 0 <= i < n})
    if bad:
        raise FrameError(f"frame_order names layer(s) {bad[:5]} outside 0..{n - 1}")
    if len(set(order)) != n:
        twice = sorted({i for i in order if order.count(i) > 1})
        raise FrameError(f"frame_order lists layer(s) {twice[:5]} more than once: it must be a permutation of "
                         f"0..{n - 1}")
    return order


def in_layer_order(frames: list, order: list[int] | None) -> list:
    """Frames received in stream order `order` (`stream_order`), put in layer order."""
    if order is None:
        return frames
    out: list = [None] * len(frames)
    for s, layer in enumerate(order):
        out[layer] = frames[s]
    return out


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
        self._taken, self._end = 0, 0  # take_complete: frames handed out, and the byte where they end

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

    def take_complete(self) -> list[tuple[int, memoryview]]:
        """The frames completed since the last call, as (index, writable memoryview), in frame order; the
        Reassembler lets go of them (a consumer that decodes frames as they arrive, the pipelined server;
        `frames()` then holds empty views in their place)."""
        out = []
        while self._taken < len(self.lengths) and self.received >= self._end + self.lengths[self._taken]:
            i = self._taken
            self._end += self.lengths[i]
            b, self._bufs[i] = self._bufs[i], None
            out.append((i, memoryview(b if b is not None else bytearray())))
            self._taken += 1
        return out

    def frames(self) -> list[memoryview]:
        """The frames, as writable memoryviews of their own buffers."""
        if self.received != self.total:
            raise FrameError(f"received {self.received} frame bytes, the header announced {self.total}")
        return [memoryview(b if b is not None else bytearray()) for b in self._bufs]

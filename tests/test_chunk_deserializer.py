"""`chunking.chunk_deserializer` (the server's zero-copy reading of Exchange chunk messages) must
read every byte string exactly as protobuf does: the same chunk bytes for a message that is one
chunk field, the same (or an equally refused) message for anything else."""
from __future__ import annotations

import random

import pytest
from efmuon.common.wire import chunking
from efmuon.server.service import Undecodable, _safe
from efmuon.v1 import service_pb2 as pb


def _parse(cls):
    safe = _safe(cls)
    return chunking.chunk_deserializer(cls, safe), safe


def _same(a, b, data: bytes) -> None:
    """Both readings agree: the same oneof and chunk bytes; or both refused. The view's size is the
    bytes received (protobuf's ByteSize re-serialises, so it differs only for a non-minimal varint)."""
    if isinstance(b, Undecodable):
        assert isinstance(a, Undecodable)
        return
    assert not isinstance(a, Undecodable)
    assert a.WhichOneof("part") == b.WhichOneof("part")
    assert a.ByteSize() == (len(data) if isinstance(a, chunking.ReceivedChunk) else b.ByteSize())
    if b.WhichOneof("part") == "chunk":
        assert bytes(a.chunk) == b.chunk


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 1 << 20])
def test_a_chunk_message_is_read_as_a_view_of_the_same_bytes(n):
    fast, slow = _parse(pb.Submission)
    payload = bytes(random.Random(n).getrandbits(8) for _ in range(min(n, 4096))) * (n // 4096 + 1)
    data = pb.Submission(chunk=payload[:n]).SerializeToString()
    got = fast(data)
    assert isinstance(got, chunking.ReceivedChunk)
    assert isinstance(got.chunk, memoryview) and got.chunk.readonly
    assert got.ByteSize() == len(data) == chunking.received_chunk_size(got, n)
    _same(got, slow(data), data)


def test_non_minimal_varint_length_still_agrees_with_protobuf():
    fast, slow = _parse(pb.Submission)
    tag = pb.Submission.DESCRIPTOR.fields_by_name["chunk"].number << 3 | 2
    # length 3 written in 2 bytes (0x83 0x00): legal protobuf, not what our sender writes
    data = bytes([tag, 0x83, 0x00]) + b"abc"
    _same(fast(data), slow(data), data)


def test_random_and_corrupted_messages_agree_with_protobuf():
    fast, slow = _parse(pb.Submission)
    rng = random.Random(7)
    tag = pb.Submission.DESCRIPTOR.fields_by_name["chunk"].number << 3 | 2
    header = pb.Submission(header=pb.SubmissionHeader(round=3, client_id=1)).SerializeToString()
    cases = [b"", bytes([tag]), bytes([tag, 0x80]), header, header[:-1]]
    for _ in range(3000):
        n = rng.randrange(0, 40)
        body = bytes(rng.getrandbits(8) for _ in range(n))
        good = bytes([tag]) + _varint(n) + body
        kind = rng.randrange(5)
        if kind == 0:
            data = good
        elif kind == 1:  # cut short
            data = good[:rng.randrange(len(good))]
        elif kind == 2:  # trailing bytes: a second field or garbage
            data = good + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 6)))
        elif kind == 3:  # a chunk followed by a header (both set: the oneof keeps the last)
            data = good + header
        else:  # pure noise
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 50)))
        cases.append(data)
    for data in cases:
        _same(fast(data), slow(data), data)

"""The worker's side of the zero-copy chunk path: `chunking.iter_chunk_messages` /
`submission_messages` (chunk messages pre-serialized by one join) must send exactly the bytes
protobuf would and count them exactly; `stub.client_stub` must read reply chunks as views and
refuse a reply protobuf cannot parse just as the generated stub does."""
from __future__ import annotations

import random
from concurrent import futures

import grpc
import pytest
from efmuon.common.wire import chunking, protocol
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc
from efmuon.worker import stub as worker_stub

LAYOUTS = [  # frame lengths, chunk size
    ([], 8), ([0], 8), ([0, 0, 5], 8), ([8], 8), ([16], 8), ([17], 8), ([3, 5, 7, 1, 0, 20], 8),
    ([1] * 30, 8), ([127], 127), ([128, 1], 128), ([300, 299, 2], 200), ([70000], 1 << 14),
    ([(1 << 20) + 3, 5, 1 << 20], 1 << 20),
]


def _frames(lengths: list[int], seed: int) -> list:
    rng = random.Random(seed)
    kinds = (bytes, bytearray, memoryview)
    return [kinds[i % 3](rng.randbytes(n)) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("lengths,size", LAYOUTS)
def test_pre_serialized_chunk_messages_are_protobufs_own_bytes(lengths, size):
    frames = _frames(lengths, len(lengths) * 31 + size)
    chunks = list(chunking.iter_chunks(frames, size))
    messages = list(chunking.iter_chunk_messages(frames, pb.Submission, size))
    assert len(messages) == len(chunks)
    for chunk, message in zip(chunks, messages):
        assert type(message) is bytes
        assert message == pb.Submission(chunk=chunk).SerializeToString()
        assert len(message) == chunking.chunk_message_size(pb.Submission, len(chunk))
        assert worker_stub.submission_serializer(message) is message  # sent as it is


@pytest.mark.parametrize("cls", [pb.Submission, pb.Downlink, pb.JoinReply])
def test_other_messages_with_a_chunk_field_serialize_alike(cls):
    frames = _frames([5, 300, 1], 3)
    for chunk, message in zip(chunking.iter_chunks(frames, 128), chunking.iter_chunk_messages(frames, cls, 128)):
        assert message == cls(chunk=chunk).SerializeToString()


def test_submission_messages_count_exactly_what_is_sent():
    frames = _frames([(1 << 20) + 7, 100, 3 << 20], 5)
    header = pb.SubmissionHeader(client_id=2, session="s", round=9, frame_lengths=[len(f) for f in frames],
                                 train_loss=1.5)
    sizes: list[int] = []
    stream = list(worker_stub.submission_messages(header, frames, sizes))
    assert isinstance(stream[0], pb.Submission) and stream[0].header == header
    wire = [worker_stub.submission_serializer(m) for m in stream]
    assert sizes == [len(w) for w in wire]
    parsed = [pb.Submission.FromString(w) for w in wire]
    assert parsed[0] == stream[0]
    assert all(m.WhichOneof("part") == "chunk" for m in parsed[1:])
    assert [m.chunk for m in parsed[1:]] == list(chunking.iter_chunks(frames))
    assert b"".join(m.chunk for m in parsed[1:]) == b"".join(bytes(f) for f in frames)


def test_reply_deserializers_view_chunks_and_parse_the_rest():
    for cls, header in ((pb.Downlink, pb.Downlink(header=pb.DownlinkHeader(round=4))),
                        (pb.JoinReply, pb.JoinReply(header=pb.JoinHeader(client_id=1)))):
        read = chunking.chunk_deserializer(cls, cls.FromString)
        got = read(cls(chunk=b"x" * 1000).SerializeToString())
        assert isinstance(got, chunking.ReceivedChunk) and bytes(got.chunk) == b"x" * 1000
        assert read(header.SerializeToString()) == header
        with pytest.raises(Exception) as refused:
            read(b"\x12\x05ab")  # a chunk field cut short
        with pytest.raises(type(refused.value)):
            cls.FromString(b"\x12\x05ab")


def _reply_server(replies: list[bytes]):
    """A server whose Exchange and Join answer these raw bytes as the reply messages."""
    def exchange(request_iterator, context):
        for _ in request_iterator:
            pass
        yield from replies

    def join(request, context):
        yield from replies

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("efmuon.v1.ParameterServer", {
        "Exchange": grpc.stream_stream_rpc_method_handler(exchange),
        "Join": grpc.unary_stream_rpc_method_handler(join)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _calls(stub, frames):
    header = pb.SubmissionHeader(round=1, frame_lengths=[len(f) for f in frames])
    return {"Exchange": lambda: list(stub.Exchange(worker_stub.submission_messages(header, frames, []), timeout=10)),
            "Join": lambda: list(stub.Join(pb.JoinRequest(client_name="t"), timeout=10))}


def test_client_stub_reads_views_and_refuses_malformed_replies_like_the_generated_stub():
    frames = _frames([3 << 20], 1)
    good = [pb.Downlink(header=pb.DownlinkHeader(round=2)).SerializeToString(),
            pb.Downlink(chunk=b"abc").SerializeToString()]
    bad = good[:1] + [b"\x12\x05ab"]
    server, port = _reply_server(good)
    bad_server, bad_port = _reply_server(bad)
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}", options=protocol.CHANNEL_OPTIONS) for p in (port, bad_port)]
    try:
        replies = _calls(worker_stub.client_stub(channels[0]), frames)["Exchange"]()
        assert replies[0].header.round == 2
        assert isinstance(replies[1], chunking.ReceivedChunk) and bytes(replies[1].chunk) == b"abc"

        for method in ("Exchange", "Join"):
            codes = []
            # the generated stub cannot send pre-serialized chunks: it sends the header alone
            for stub, sent in ((worker_stub.client_stub(channels[1]), frames),
                               (pb_grpc.ParameterServerStub(channels[1]), [])):
                call = _calls(stub, sent)[method]
                with pytest.raises(grpc.RpcError) as err:
                    call()
                codes.append(err.value.code())
            assert codes[0] == codes[1] == grpc.StatusCode.INTERNAL, (method, codes)
    finally:
        for ch in channels:
            ch.close()
        server.stop(0)
        bad_server.stop(0)

"""The worker's gRPC stub: the generated ParameterServerStub with Join and Exchange rebound so that
chunk payloads are neither serialized nor copied twice.

Exchange's request stream is `submission_messages`: the header as a protobuf message, then each chunk
message already serialized (`common.wire.chunking.iter_chunk_messages`), passed through as bytes by
`submission_serializer`. The replies of Join and Exchange are parsed by `chunking.chunk_deserializer`,
whose chunks are read-only views of gRPC's bytes. The wire bytes are the generated stub's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ..common.wire.chunking import chunk_deserializer, iter_chunk_messages
from ..v1 import service_pb2 as pb
from ..v1 import service_pb2_grpc as pb_grpc


def submission_messages(header: pb.SubmissionHeader, frames: Iterable, sizes: list,
                        sending: Callable[[], None] | None = None) -> Iterator[pb.Submission | bytes]:
    """The Exchange request stream: the header message (a pb.Submission), then the frames as chunk
    messages already serialized (`iter_chunk_messages`; the stub of `client_stub` sends them as they are).
    `frames` is consumed as the stream goes (worker.uplink encodes each frame when it is reached).

    Appends each message's serialized size to `sizes` (the `message` byte level): for the chunk
    messages that is their length, so nothing is serialized a second time. `sending()`, when given,
    is called just before each chunk message is handed to gRPC."""
    first = pb.Submission(header=header)
    sizes.append(first.ByteSize())
    yield first
    for message in iter_chunk_messages(frames, pb.Submission):
        sizes.append(len(message))
        if sending is not None:
            sending()
        yield message


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

"""The reply to one round (`Plan`): S_{k+1}'s frames, cut into Downlink chunk messages once for all clients."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..common.wire import chunking
from ..v1 import service_pb2 as pb


@dataclass
class Plan:
    """The reply to round k's submissions: S_{k+1}'s frames, cut into chunk messages once."""

    round: int
    done: bool
    frame_lengths: list[int]
    chunks: list[pb.Downlink] = field(default_factory=list)
    chunk_message_bytes: int = 0
    released: bool = False  # the chunks were freed (release()): a duplicate gets a resync instead

    @classmethod
    def build(cls, round_: int, frames: list[bytes] | None) -> "Plan":
        """Cut `frames` into chunk messages. A list given is consumed: each frame is dropped from it as
        soon as it is cut, so the frames and the chunks are not both alive in full."""
        if frames is None:
            return cls(round_, True, [])
        lengths = [len(f) for f in frames]

        def consume():
            if isinstance(frames, list):
                for i in range(len(frames)):
                    f, frames[i] = frames[i], None
                    yield f
            else:
                yield from frames
        chunks, size = [], 0
        for c in chunking.iter_chunks(consume()):
            size += chunking.chunk_message_size(pb.Downlink, len(c))
            chunks.append(pb.Downlink(chunk=c))
        return cls(round_, False, lengths, chunks, size)

    def release(self) -> None:
        """Free the chunks (handlers still streaming them keep their own reference to the old list)."""
        if self.chunks:
            self.chunks, self.released = [], True

    @property
    def payload(self) -> int:
        return sum(self.frame_lengths)

    def header(self, duplicate: bool = False, with_frames: bool = True) -> pb.Downlink:
        return pb.Downlink(header=pb.DownlinkHeader(
            round=self.round, done=self.done, duplicate=duplicate,
            frame_lengths=self.frame_lengths if with_frames else []))

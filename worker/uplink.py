"""The worker's side of a pipelined round (docs/design.md §4 "Pipelined rounds"): the lazy uplink, round k's
frames encoded one by one while the Exchange stream is sent, in the order a pipelined server steps its LMO
units; and the streamed downlink, each frame of S decoded as soon as it has arrived.

`WorkerState.make_uplink` encodes every layer before the first byte leaves. `LazyUplink` holds the
checked gradients instead and encodes layer i (`WorkerState.uplink_frame`: M_i, the frame of R_i,
G_i += R_i) the first time the request stream asks for it: the sync stream-stream call consumes the
stream in gRPC's own thread, so encoding frame i + 1 overlaps the sending of frame i. The layers are
independent, so any order gives `make_uplink`'s bits. Each frame is encoded exactly once (under a
lock: a stream of a failed call may still be running while the worker resends) and kept until the
server's reply acknowledges the round (`release`), so a resend after a reconnect sends the same bytes;
`finish` encodes whatever the stream did not reach (the worker calls it when a call fails).

The header announces `frame_lengths` before any frame exists: `fixed_lengths` computes them from the
shapes when every layer's compressor writes frames of a size set by the shape alone (identity and the
value codecs, randk, rankk); a data-dependent one (topk: its index layout) makes `lazy_uplink` encode
everything first, as before.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from ..common.algorithm import WorkerState
from ..common.compress import Compressor
from ..common.errors import FrameError, ProtocolError
from ..common.lmo import LayerSpec
from ..common.pipeline import uplink_order
from ..common.wire.chunking import Reassembler

Events = Callable[[str, int, float, float], None]


def fixed_lengths(comps: Sequence[Compressor], specs: Sequence[LayerSpec]) -> list[int] | None:
    """Each layer's frame length when every compressor's is a function of the shape alone, else None
    (a compressor whose frame has a data-dependent layout, `Compressor.frame_layout`: topk)."""
    if any(type(c).frame_layout is not Compressor.frame_layout for c in comps):
        return None
    return [int(c.frame_size(s.shape)) for c, s in zip(comps, specs)]


class LazyUplink:
    """Round `state.round`'s uplink frames, encoded on demand in stream order (module docstring).

    `order`: the layer of each frame in stream order (`SubmissionHeader.frame_order`; None: layer order).
    `lengths`: the frames' lengths in stream order (`fixed_lengths`). `events(what, k, t0, t1)`, when
    given, gets ("uplink_frame", k, t0, t1) for each frame encoded (on whichever thread encoded it)."""

    def __init__(self, state: WorkerState, grads: list[torch.Tensor], order: list[int] | None,
                 lengths: list[int], events: Events | None = None):
        self.state, self.round = state, state.round
        self.order = order
        self.layers = list(order) if order is not None else list(range(len(state.specs)))
        self._grads: list[torch.Tensor | None] = state.checked_gradients(grads, consume=True)
        self._frames: list[bytes | None] = [None] * len(self.layers)
        self.lengths = [lengths[i] for i in self.layers]
        self.events = events
        self.released = False
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.layers)

    def frame(self, s: int) -> bytes:
        """The frame at stream position s, encoded now if it is not yet (exactly once)."""
        with self._lock:
            f = self._frames[s]
            if f is None:
                if self.released:
                    raise ProtocolError(f"round {self.round}'s uplink was released before frame {s} was encoded")
                i = self.layers[s]
                if self.state.round != self.round:
                    raise ProtocolError(f"the uplink of round {self.round} was not encoded before the worker "
                                        f"moved to round {self.state.round}")
                t0 = time.perf_counter()
                g, self._grads[i] = self._grads[i], None
                f = self.state.uplink_frame(i, g)
                del g
                if len(f) != self.lengths[s]:
                    raise ProtocolError(f"layer {self.state.specs[i].name}: its frame has {len(f)} bytes, "
                                        f"{self.lengths[s]} were announced")
                self._frames[s] = f
                if self.events is not None:
                    self.events("uplink_frame", self.round, t0, time.perf_counter())
            return f

    def stream(self) -> Iterator[bytes]:
        """The frames in stream order, each encoded when it is reached; stops once released."""
        for s in range(len(self.layers)):
            try:
                f = self.frame(s)
            except ProtocolError:
                if self.released:  # the server answered before it read everything (a 'done' reply)
                    return
                raise
            yield f

    def finish(self) -> None:
        """Encode every frame not yet encoded (nothing once released): the state then holds the whole round."""
        for s in range(len(self.layers)):
            if self.released:
                return
            self.frame(s)

    def frames(self) -> list[bytes]:
        """Every frame in stream order (`finish` first)."""
        self.finish()
        return list(self._frames)

    def release(self) -> None:
        """The server acknowledged the round: the frames (and any gradient left) are freed."""
        with self._lock:
            self.released = True
            self._frames = [None] * len(self.layers)
            self._grads = [None] * len(self._grads)


def lazy_uplink(state: WorkerState, grads: list[torch.Tensor], cfg, events: Events | None = None):
    """Round `state.round`'s submission: a `LazyUplink` in the pipelined step's unit order (`uplink_order`)
    when the frame lengths are known up front (`fixed_lengths`), else `make_uplink`'s frames."""
    lengths = fixed_lengths(state.up, state.specs)
    if lengths is None:
        return state.make_uplink(grads, consume=True)
    return LazyUplink(state, grads, uplink_order(state.specs, cfg), lengths, events)


class StreamedDownlink:
    """The downlink S_k decoded frame by frame as the reply's chunks arrive (`take` after each chunk), each
    frame's buffer freed once decoded (`WorkerState.decode_downlink`: nothing of the state changes; the
    worker adds S to W once every layer is in, `add_downlink`). ("downlink_frame", k, t0, t1) per frame."""

    def __init__(self, state: WorkerState, k: int, events: Events | None = None):
        self.state, self.k, self.events = state, k, events
        self.S: list[torch.Tensor] = []

    def take(self, parts: Reassembler) -> None:
        """Decode the frames `parts` completed since the last call (they complete in layer order)."""
        for i, frame in parts.take_complete():
            t0 = time.perf_counter()
            self.S.append(self.state.decode_downlink(i, frame))
            del frame
            if self.events is not None:
                self.events("downlink_frame", self.k, t0, time.perf_counter())

    def result(self, parts: Reassembler) -> list[torch.Tensor]:
        """S, every layer; a FrameError when the reply was short or did not hold every layer."""
        if parts.received != parts.total:
            raise FrameError(f"received {parts.received} frame bytes, the header announced {parts.total}")
        self.take(parts)  # frames of no bytes complete without a chunk
        S, self.S = self.S, []
        if len(S) != len(self.state.specs):
            raise FrameError(f"downlink: expected {len(self.state.specs)} layer frames, got {len(S)}")
        return S

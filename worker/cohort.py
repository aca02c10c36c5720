"""The worker's side of a cohort run (server.cohorts, docs/design.md §6): catching up on missed rounds,
giving back a straggler's state, and emulating a slow client's compute.

In a cohort run the reply to an Exchange is the next round the client is sampled in: a DownlinkHeader
whose `catchup_*` fields bring its W from the round it holds to W_{round-1} (the missed downlinks
replayed in order, or W_{round-1} itself), then S_round. `late` says the submission missed its round:
the client takes back the M_j, G_j (and ef14 error) it had before computing it (`Snapshot`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from ..common.algorithm import WorkerState
from ..common.compress import parse_spec
from ..common.errors import ProtocolError
from ..common.federation import compute_factors
from ..v1 import service_pb2 as pb


class Snapshot:
    """M_j, G_j and the ef14 error before a submission was computed (kept while a deadline may drop it)."""

    def __init__(self, state: WorkerState, round_: int):
        self.round = round_
        self.M = [m.clone() for m in state.M]
        self.Gj = [g.clone() for g in state.Gj]
        self.error = None if state.error is None else [e.clone() for e in state.error]

    def restore(self, state: WorkerState) -> None:
        state.M, state.Gj, state.error = self.M, self.Gj, self.error


def catch_up(state: WorkerState, header: pb.DownlinkHeader, frames: Sequence[bytes]) -> None:
    """Bring W from round `catchup_from` to `round - 1` with the reply's catch-up frames (module docstring).
    Everything is decoded before W changes; a bad frame raises FrameError and changes nothing."""
    layers = len(state.specs)
    start, target = int(header.catchup_from), int(header.round) - 1
    if not frames:
        if state.round != target:
            raise ProtocolError(f"the server sent round {header.round}'s downlink with no catch-up, but this "
                                f"client holds the W of round {state.round}")
        return
    if start != state.round:
        raise ProtocolError(f"the catch-up starts at round {start}; this client holds the W of round {state.round}")
    if header.catchup_full:
        if len(frames) != layers:
            raise ProtocolError(f"a full-W catch-up of {len(frames)} frames; the model has {layers} layers")
        ident = parse_spec("identity")
        W = [ident.decode(f, s.shape, device=state.device) for f, s in zip(frames, state.specs)]
        for w, new in zip(state.W, W):
            w.copy_(new)
        # no S frames: the frames are W_round itself (the server's current W); else W_{round-1}
        state.round = target + 1 if not header.frame_lengths else target
        return
    if len(frames) != layers * (target - start):
        raise ProtocolError(f"a catch-up of {len(frames)} frames for rounds {start + 1}..{target}: expected "
                            f"{layers * (target - start)} ({layers} layers per round)")
    decoded = []
    for r in range(target - start):  # decode all first: a bad frame leaves W as it was
        part = frames[r * layers:(r + 1) * layers]
        decoded.append([c.decode(f, s.shape, device=state.device) for c, f, s in zip(state.down, part, state.specs)])
    for S in decoded:  # the same additions, in the same order, as the server's W took them
        for w, s in zip(state.W, S):
            w.add_(s)
        state.round += 1


class ComputeScale:
    """Emulated compute speed (the run's compute_scale / compute_seconds): after computing a submission
    the client sleeps so that the round's compute lasts (compute_seconds, or the time it took) times its
    factor, as `simulate` counts it on its simulated clock. Nothing when neither is set."""

    def __init__(self, cfg, client: int, n: int):
        self.seconds = cfg.compute_seconds
        self.factor = 1.0
        if cfg.compute_scale is not None:
            self.factor = compute_factors(cfg.compute_scale, n, cfg.seed)[client]
        self.active = cfg.compute_seconds is not None or self.factor != 1.0

    def pad(self, measured: float) -> float:
        """Sleep the rest of the emulated compute time; returns the seconds slept."""
        if not self.active:
            return 0.0
        base = measured if self.seconds is None else float(self.seconds)
        rest = base * self.factor - measured
        if rest > 0:
            time.sleep(rest)
        return max(0.0, rest)


def split_reply(header: pb.DownlinkHeader, frames: list) -> tuple[list, list]:
    """(catch-up frames, S's frames) of a reply whose frames were reassembled as one list."""
    n = len(header.catchup_frame_lengths)
    return frames[:n], frames[n:]


def expected_frames(header: pb.DownlinkHeader) -> list[int]:
    return list(header.catchup_frame_lengths) + list(header.frame_lengths)

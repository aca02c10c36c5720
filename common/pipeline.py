"""The pipelined round (docs/design.md §5, `efmuon server --pipeline`): the server's step of round k taken
LMO unit by LMO unit while the uplinks still stream in, with `ServerState.step`'s arithmetic exactly.

`PipelinedStep` is one round's step. The networked server hands it each uplink frame as soon as the frame
is complete (`add_frame`, on the compute thread): the frame is decoded and checked like `decode_uplink`
does (`ServerState.decode_frame`), and once every expected client's frame of every layer of an LMO unit is
in, that unit's step is computed INTO TEMPORARIES:

    G'_i = G_i + (R_{j0,i} + R_{j1,i} + ... in client order) / n        (as `apply_decoded`)
    d    = lmo_all(G'_unit, threads = the whole step's block's count)   (as `step`'s block call)
    X'_i, frame_i, W'_i = `_update_layer` on copies of X_i and W_i

An LMO unit is what `lmo_units` says about one of `step`'s blocks (`lmo_blocks`): a zero-padded group of
spectral matrices, or one layer; each runs with the thread count its block's call would use
(`ServerState.block_threads`), so every unit computes the bits the whole step computes for its layers
(the argument of the sharded server, common.shards, tests/test_shards.py). Nothing of X, W, G or the
estimators changes before `commit`, which the server calls once every submission of the round is in and
valid: it computes any unit still missing, swaps the temporaries in, updates the estimators as
`apply_decoded` does and returns the downlink frames (`step`'s). `discard(j)` forgets client j's frames
(a refused or broken submission) and every unit computed with them, so state is never half-applied.

`unsupported(cfg, state)` says when the pipeline cannot apply: presets with a quantity over all layers
(MuonMax's sum of nuclear norms, MoMo's <X, G>), AdamW, ef14 (G is this round's mean, the airbench
buffer), a shard's state. Pure functions of the state; no transport here.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from .algorithm import MUONMAX, ServerState, lr_at
from .config import RunConfig
from .errors import FrameError, ProtocolError
from .lmo import LayerSpec, lmo_all, lmo_blocks, lmo_units


def unsupported(cfg: RunConfig, state: ServerState | None = None) -> str | None:
    """Why the pipelined round cannot step this run (None: it can)."""
    if cfg.preset in MUONMAX:
        return f"preset {cfg.preset} scales every layer by a sum over all layers"
    if cfg.preset == "adamw":
        return "preset adamw takes no LMO step"
    if cfg.method == "ef14":
        return "method ef14 replaces G by the round's mean"
    if state is not None and state.layer_ids != list(range(len(state.specs))):
        return "a shard's server steps its layers as one block"
    return None


def step_units(specs: Sequence[LayerSpec], blocks: Sequence[Sequence[int]],
               nbytes: Sequence[int]) -> list[tuple[list[int], list[list[int]]]]:
    """(block, its LMO units as model layer indices) for each of `step`'s blocks, in the order the
    pipelined step takes them (`PipelinedStep`, `uplink_order`)."""
    out = []
    for block in blocks:
        block = list(block)
        units = lmo_units([specs[i] for i in block], [nbytes[i] for i in block])
        out.append((block, [[block[x] for x in u] for u in units]))
    return out


def uplink_order(specs: Sequence[LayerSpec], cfg: RunConfig) -> list[int] | None:
    """The order a worker streams its uplink frames in (`SubmissionHeader.frame_order`): the layers of the
    pipelined step's LMO units, unit after unit, as `PipelinedStep` steps them (the blocks of
    `ServerState.lmo_blocks` with its default sizes), so a pipelined server completes its first units
    early. None when that is layer order, or the run's rounds are not pipelined (`unsupported`).
    Any order gives the same bits: the server puts the frames back in layer order."""
    if unsupported(cfg) is not None:
        return None
    nbytes = [4 * math.prod(s.shape) for s in specs]
    blocks = lmo_blocks(specs, nbytes, ServerState.LMO_BLOCK_MIN_BYTES, ServerState.LMO_BLOCK_FRACTION)
    order = [i for _, units in step_units(specs, blocks, nbytes) for u in units for i in u]
    return None if order == list(range(len(specs))) else order


class PipelinedStep:
    """Step `state.round + 1`, computed unit by unit from `clients`' uplink frames (module docstring)."""

    def __init__(self, state: ServerState, clients: Sequence[int]):
        why = unsupported(state.cfg, state)
        if why is not None:
            raise ValueError(f"the pipelined step cannot run: {why}")
        self.state, self.k = state, state.round + 1
        self.clients = sorted(int(j) for j in clients)
        n_layers = len(state.specs)
        self.R: dict[int, list[torch.Tensor | None]] = {j: [None] * n_layers for j in self.clients}
        self.zeroed: dict[int, int] = {j: 0 for j in self.clients}
        self.have = [0] * n_layers  # how many clients' frame of layer i are decoded
        self.owner: dict[tuple[int, int], object] = {}  # (client, layer) -> the stream that sent it
        self.units: list[tuple[list[int], int]] = []  # (layers, lmo threads)
        for block, units in step_units(state.specs, state.lmo_blocks(), [4 * x.numel() for x in state.X]):
            threads = state.block_threads([state.specs[i] for i in block])
            self.units += [(u, threads) for u in units]
        self.unit_of = [0] * n_layers
        for u, (layers, _) in enumerate(self.units):
            for i in layers:
                self.unit_of[i] = u
        self.done: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bytes]]] = {}
        self.unit_times: list[tuple[float, float]] = []  # perf_counter (start, end) of each unit computed

    # ------------------------------------------------------------------ frames in
    def add_frame(self, j: int, i: int, frame, owner=None) -> None:
        """Client j's uplink frame of layer i: decode and check it (FrameError naming the layer), keep
        R_{j,i}, and step every unit this frame completes. Mutates nothing of the state. `owner`: who sent
        it (a stream), for `discard`."""
        if j not in self.R:
            raise ProtocolError(f"client {j} is not one of this round's clients {self.clients}")
        if not 0 <= i < len(self.have):
            raise FrameError(f"frame {i}: the model has {len(self.have)} layers")
        d, bad = self.state.decode_frame(i, frame)
        del frame
        u = self.unit_of[i]
        if self.R[j][i] is None:
            self.have[i] += 1
        else:  # the same frame again (a second stream of the client): its unit is stale
            self.done.pop(u, None)
        self.R[j][i] = d
        self.owner[j, i] = owner
        self.zeroed[j] += bad
        layers = self.units[u][0]
        if u not in self.done and all(self.have[m] == len(self.clients) for m in layers):
            self._compute(u)

    def discard(self, j: int, owner=None) -> None:
        """Forget client j's frames of this round (with `owner`: only those it sent) and every unit
        computed with them."""
        if j not in self.R:
            return
        for i, r in enumerate(self.R[j]):
            if r is not None and (owner is None or self.owner.get((j, i)) is owner):
                self.have[i] -= 1
                self.done.pop(self.unit_of[i], None)
                self.R[j][i] = None
                self.owner.pop((j, i), None)
        self.zeroed[j] = 0

    def decoded(self, j: int) -> tuple[list[torch.Tensor], int]:
        """Client j's R_j (every layer decoded) and its zeroed count; a FrameError if a frame is missing."""
        missing = [self.state.specs[i].name for i, r in enumerate(self.R[j]) if r is None]
        if missing:
            raise FrameError(f"no frame of layer(s) {', '.join(missing[:5])}")
        return list(self.R[j]), self.zeroed[j]

    # ------------------------------------------------------------------ the step
    def _compute(self, u: int) -> None:
        t0 = time.perf_counter()
        st, cfg = self.state, self.state.cfg
        layers, threads = self.units[u]
        t, wd = lr_at(cfg, self.k), cfg.weight_decay
        G = []
        for i in layers:
            acc = self.R[self.clients[0]][i].clone()
            for j in self.clients[1:]:
                acc.add_(self.R[j][i])
            G.append(st.G[i].clone().add_(acc.div_(st.n)))
            del acc
        specs = [st.specs[i] for i in layers]
        directions = lmo_all(G, specs, ns_steps=cfg.ns_steps, coeffs=cfg.ns_coeffs, threads=threads)
        ts = st.step_sizes(directions, G, t, layers)
        out = []
        for x, i in enumerate(layers):
            X, W = st.X[i].clone(), st.W[i].clone()
            d, directions[x] = directions[x], None
            frame = st._update_layer(i, self.k, t, d, ts[x], wd, X, W)
            out.append((G[x], X, W, frame))
        self.done[u] = out
        self.unit_times.append((t0, time.perf_counter()))

    def complete(self) -> bool:
        """Every client's every frame is in."""
        return all(h == len(self.clients) for h in self.have)

    def commit(self) -> list[bytes]:
        """Apply the round: the units still missing, then G, X, W, the estimators and the round counter, as
        `apply_decoded` + `step` would. Returns the downlink frames. Needs every client's every frame."""
        if not self.complete():
            raise ValueError("commit: some client's frames are missing")
        for u in range(len(self.units)):
            if u not in self.done:
                self._compute(u)
        st = self.state
        frames: list = [None] * len(self.have)
        for u, (layers, _) in enumerate(self.units):
            for i, (g, x, w, frame) in zip(layers, self.done.pop(u)):
                st.G[i], st.X[i], st.W[i], frames[i] = g, x, w, frame
        decoded = {j: self.R.pop(j) for j in self.clients}
        st.apply_estimators(decoded, consume=True)
        st.round = self.k
        return frames

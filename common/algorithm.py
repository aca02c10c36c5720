"""EF21-Muon: the state each side holds and the round of docs/design.md §1, with no transport.

The networked server and worker, the in-process simulator and the tests all drive these two
classes, so a networked run and a simulated run with the same seeds end in the same bits.

One round k (k = 1, 2, ...):

    server:  X  <- X + t_k * lmo(G)             (per layer; + decoupled decay X *= 1 - t_k*wd)
             S  <- C_down(X - W)                 frames encoded ONCE, the same bytes go to every worker
             W  <- W + S
    worker:  W  <- W + S
             g  <- stochastic gradient of f_j at W
             M_j <- (1 - beta) M_j + beta g      (beta weights the new gradient)
             R_j <- C_up(M_j - G_j) ;  G_j <- G_j + R_j ;  send R_j
    server:  G  <- G + (1/n) sum_j R_j           (so G == mean_j G_j at every step)

Both sides add the *decoded* frame, never the tensor before encoding, so the worker's G_j and
the server's copy of it, and the worker's W and the server's W, hold identical bits.

Initialisation (`init`): 'grad' (default) sets G_j = M_j = g_j(X_0), sent uncompressed once
(`WorkerState.init_uplink` / `ServerState.aggregate(..., init=True)`); 'zero' starts from
G_j = M_j = 0 and skips that exchange.

`method='ef14'` runs classic residual error feedback instead, for comparison: the worker keeps an
error e_j and sends C_up(M_j + e_j) (e_j <- M_j + e_j - decoded); the server uses the mean of this
round's decoded messages as G. Its downlink C_down(X - W) is the same expression as EF21-P, since
X - W is exactly the server's accumulated residual. `ef14_variant='airbench'` replaces the downlink
with the seed note's "ErrorFeedbackQuantizedMuon": the post-LMO update is quantised per tensor
with max-abs scaling to `ef14_bits` bits, applied to both X and W (X == W), and its error feeds a
buffer b <- decay*b + (1-decay)*(update - quantised) that is added to G before the next LMO.
"""
from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

import torch

from .compress import Compressor, parse_spec
from .preset_steps import PresetSteps
from .config import RunConfig
from .errors import ConfigError, FrameError, ProtocolError
from .lmo import LayerSpec, dual_norm, lmo_all, lmo_all_threads, lmo_blocks

UP, DOWN, INIT = 1, 2, 3
_MASK64 = (1 << 63) - 1

MAX_ABS_VALUE = 1e30  # an uplink entry larger than this is refused: G would overflow float32
NAN_POLICIES = ("reject", "zero")  # what `ServerState.decode_uplink` does with a NaN/Inf: refuse, or zero it
MUONMAX = ("muonmax", "muonmax-momo")  # the presets whose every layer steps by the (stale) sum of nuclear norms


def frame_seed(run_seed: int, direction: int, round_: int, layer: int, client: int = 0) -> int:
    """Seed of one frame's randomness (randk mask, rankk sketch, stochastic rounding).

    A pure function of where the frame sits in the run, so both ends (and a resumed run)
    derive the same seed without sending it around.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{run_seed}/{direction}/{round_}/{layer}/{client}".encode())
    return int.from_bytes(h.digest(), "little") & _MASK64


def lr_at(cfg: RunConfig, k: int) -> float:
    """Step size t_k of round k = 1..rounds: linear warm-up, then constant, cosine or linear decay.

    Decay reaches zero one step after the last round, so no round takes a zero step.
    """
    lr, rounds, warmup = float(cfg.lr), int(cfg.rounds), int(cfg.warmup)
    if warmup and k <= warmup:
        return lr * k / warmup
    if cfg.schedule == "constant":
        return lr
    progress = (k - warmup - 1) / max(1, rounds - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def layer_compressors(specs: Sequence[LayerSpec], default: str, patterns: Mapping[str, str],
                      check_unused: bool = True) -> list[Compressor]:
    """Per-layer compressor: the first name pattern (fnmatch) that matches wins, else `default`.
    A pattern that matches no parameter is a ConfigError listing the parameter names (a typo would
    otherwise silently compress that layer with the default); `check_unused=False` skips that check
    (a shard's layers: the pattern may match another shard's, common.shards checks the whole model)."""
    names = [s.name for s in specs]
    unused = [pat for pat in patterns if not any(fnmatchcase(n, pat) for n in names)] if check_unused else []
    if unused:
        shown = ", ".join(names[:40]) + (f", ... ({len(names) - 40} more)" if len(names) > 40 else "")
        raise ConfigError(f"per-layer compressor pattern(s) {', '.join(map(repr, unused))} match no parameter; "
                          f"the model's parameters are: {shown}")
    out = []
    for s in specs:
        chosen = default
        for pat, spec in patterns.items():
            if fnmatchcase(s.name, pat):
                chosen = spec
                break
        c = parse_spec(chosen)
        if s.stacked and hasattr(c, "per_expert"):  # rankk: rank r per expert matrix
            c = c.per_expert(s.shape[0])
        out.append(c)
    return out


@functools.cache
def _identity() -> Compressor:
    return parse_spec("identity")


def all_finite(t: torch.Tensor) -> bool:
    """True when `t` holds no NaN and no +-inf; exactly `torch.isfinite(t).all()`, at a fraction of its cost.

    One `aminmax` reduction reads the tensor once and makes two scalars, where `isfinite` writes a
    bool tensor of the tensor's size and `all` reads it again: on the 10.5M decoded floats of a
    5.24 MB topk:0.1 uplink, 2.4 ms instead of 36 ms (one thread), so the check no longer costs
    more than the decode. Exact because a NaN anywhere makes both ends NaN (aminmax propagates NaN;
    tests/test_algorithm.py checks it on the installed torch) and an infinity is itself the minimum
    or the maximum; an empty tensor has no non-finite entry (and no aminmax)."""
    if t.numel() == 0:
        return True
    lo, hi = t.aminmax()
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def params_sha256(params: Sequence[torch.Tensor], names: Sequence[str]) -> str:
    """sha256 over the float32 little-endian bytes of the parameters, in sorted name order."""
    h = hashlib.sha256()
    for _, p in sorted(zip(names, params), key=lambda t: t[0]):
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class ServerState(PresetSteps):
    """Server side of EF21-Muon: X (exact model), W (workers' model), G = mean_j G_j, step k.

    It also keeps each client's estimator G_j (`estimators`), which lets a client that lost its
    state re-sync and lets partial participation keep G the mean over all n clients.
    `nan_policy` (one of NAN_POLICIES): what `decode_uplink` does with an uplink's NaN/Inf.
    `layer_ids`: a shard's state (docs/design.md §6.3) holds only some layers of the model; these are
    their global indices (ascending), which seed the downlink frames (`frame_seed`) exactly as the whole
    model's server does. None: the whole model (layer i is layer i).
    """

    def __init__(self, params: Sequence[torch.Tensor], specs: Sequence[LayerSpec], cfg: RunConfig,
                 n_clients: int, device: str | torch.device = "cpu", keep_estimators: bool = True,
                 nan_policy: str = "reject", layer_ids: Sequence[int] | None = None):
        if len(params) != len(specs):
            raise ValueError("one LayerSpec per parameter is required")
        if layer_ids is not None and (len(layer_ids) != len(specs) or list(layer_ids) != sorted(set(layer_ids))):
            raise ValueError("layer_ids: one ascending, distinct global index per layer")
        self.layer_ids = list(range(len(specs))) if layer_ids is None else [int(i) for i in layer_ids]
        if layer_ids is not None and cfg.preset == "muonmax":
            raise ConfigError("muonmax needs the whole model's nuclear norms: a shard's state cannot step it")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy={nan_policy!r}; choose one of {', '.join(NAN_POLICIES)}")
        self.nan_policy = nan_policy
        self.cfg, self.specs, self.n = cfg, list(specs), int(n_clients)
        self.ids = self.n  # client ids are 0..ids-1; `n` (the mean's count) may be smaller (`register`)
        self.device = torch.device(device)
        self.X = [p.detach().to(self.device, torch.float32).clone() for p in params]
        self.W = [x.clone() for x in self.X]
        self.G = [torch.zeros_like(x) for x in self.X]
        self.estimators: dict[int, list[torch.Tensor]] | None = {} if keep_estimators else None
        self.round = 0  # number of LMO steps taken (== downlinks produced)
        whole = layer_ids is None
        self.up = layer_compressors(specs, cfg.uplink, cfg.uplink_layers, check_unused=whole)
        self.down = layer_compressors(specs, cfg.downlink, cfg.downlink_layers, check_unused=whole)
        self.stale_nuclear: float | None = None  # muonmax: sum of nuclear norms from the last step
        # muonmax-momo (`observe_losses`, `momo_step`): the loss model (EMA of f - <W, g>), <W, G> at the
        # end of the last step, and the last step's truncated t; None for every other preset
        self.momo: dict | None = ({"loss_model": 0.0, "wg": None, "t": None}
                                  if cfg.preset == "muonmax-momo" else None)
        self._momo_xg = 0.0  # <X, G> at the start of the step being taken
        self.ef14_buffer = [torch.zeros_like(x) for x in self.X] if self._airbench else None
        # preset 'adamw': Adam's moments of G (m, v per layer), kept in checkpoints; no LMO step
        self.adam = ([torch.zeros_like(x) for x in self.X], [torch.zeros_like(x) for x in self.X]) \
            if cfg.preset == "adamw" else None
        if self._airbench:
            bits = cfg.ef14_bits
            self.down = [parse_spec("identity") if bits == 32 else parse_spec(f"quant:{bits}:{max(1, x.numel())}")
                         for x in self.X]

    @property
    def _airbench(self) -> bool:
        return self.cfg.method == "ef14" and self.cfg.ef14_variant == "airbench"

    # ------------------------------------------------------------------ uplink
    def decode_uplink(self, client: int, frames: Sequence, init: bool = False,
                      consume: bool = False) -> tuple[list[torch.Tensor], int]:
        """Decode and check one client's uplink frames; returns (R_j per layer, non-finite values zeroed).

        The one validation path of every uplink, the simulator's (`decode_uplinks`) and the networked
        server's. A FrameError names the layer and what is wrong: a frame that does not decode, a
        decoded shape or dtype other than the layer's, a NaN/Inf (refused, or with `nan_policy` 'zero'
        replaced by 0 and counted), or a magnitude above MAX_ABS_VALUE. An unknown client is a
        ProtocolError. Mutates no state. `init`: the uncompressed frames of the 'grad' initialisation.
        `consume`: `frames` is a list this call empties as it goes (each frame freed once decoded)."""
        if not isinstance(client, int) or not 0 <= client < self.ids:
            raise ProtocolError(f"unknown client {client!r}: clients are 0..{self.ids - 1}")
        comps = [_identity()] * len(self.specs) if init else self.up
        if len(frames) != len(self.specs):
            raise FrameError(f"expected {len(self.specs)} layer frames, got {len(frames)}")
        out, zeroed = [], 0
        for i, c in enumerate(comps):
            f = frames[i]
            if consume:
                frames[i] = None
            d, bad = self.decode_frame(i, f, c)
            del f
            zeroed += bad
            out.append(d)
        return out, zeroed

    def decode_frame(self, i: int, frame, comp: Compressor | None = None) -> tuple[torch.Tensor, int]:
        """Layer i's uplink frame decoded (with `comp`, default the layer's uplink compressor) and checked
        (`_check_decoded`): (R_{j,i}, non-finite values zeroed). A FrameError names the layer."""
        spec = self.specs[i]
        try:
            d = (self.up[i] if comp is None else comp).decode(frame, spec.shape, device=self.device)
        except FrameError as exc:
            raise FrameError(f"layer {spec.name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure on peer bytes is the peer's
            raise FrameError(f"layer {spec.name}: the frame does not decode "
                             f"({type(exc).__name__}: {exc})") from None
        return self._check_decoded(spec, d)

    def _check_decoded(self, spec: LayerSpec, d: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Layer `spec`'s decoded uplink, checked (see `decode_uplink`): (it, or it with NaN/Inf zeroed; how many)."""
        if tuple(d.shape) != tuple(spec.shape) or d.dtype != torch.float32:
            raise FrameError(f"layer {spec.name}: decoded to {tuple(d.shape)} {d.dtype}, expected "
                             f"{tuple(spec.shape)} float32")
        if not d.numel():
            return d, 0
        # one pass (aminmax; NaN propagates through it, see all_finite) answers both checks for a clean
        # frame; the full isfinite pass runs only for a frame that has a NaN/Inf
        lo, hi = (float(v) for v in d.aminmax())
        bad = 0
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = torch.isfinite(d)
            bad = int(finite.numel() - int(finite.sum()))
            if self.nan_policy == "reject":
                raise FrameError(f"layer {spec.name}: {bad} non-finite value(s) (NaN/Inf); the server's "
                                 "--nan-policy is reject")
            d = torch.where(finite, d, torch.zeros((), dtype=d.dtype, device=d.device))
            lo, hi = (float(v) for v in d.aminmax())
        if max(-lo, hi) > MAX_ABS_VALUE:
            raise FrameError(f"layer {spec.name}: a value of magnitude {max(-lo, hi):.3g} is above "
                             f"{MAX_ABS_VALUE:g}; G would overflow")
        return d, bad

    def decode_uplinks(self, uplinks: Mapping[int, Sequence], init: bool = False) -> dict[int, list[torch.Tensor]]:
        """`decode_uplink` for every client (sorted by id); raises FrameError/ProtocolError naming the
        client, mutates nothing. Non-finite values zeroed under nan_policy 'zero' are not counted here
        (the networked server counts them; the simulator runs with 'reject')."""
        out = {}
        for j in sorted(uplinks):
            try:
                out[j] = self.decode_uplink(j, uplinks[j], init=init)[0]
            except FrameError as exc:
                raise FrameError(f"client {j} uplink: {exc}") from None
        return out

    def aggregate(self, uplinks: Mapping[int, Sequence], init: bool = False) -> None:
        """G <- G + (1/n) sum_j R_j over the clients present (sorted by id, so the sum is reproducible).

        With `init=True` the frames are the uncompressed g_j(X_0) of the 'grad' initialisation.
        For method 'ef14', G is replaced by the mean of this round's messages instead.
        Everything is decoded and checked before any state changes.
        """
        decoded = self.decode_uplinks(uplinks, init=init)
        self.apply_decoded(decoded)

    def apply_decoded(self, decoded: Mapping[int, Sequence[torch.Tensor]], consume: bool = False) -> None:
        """G (and every G_j) from the decoded uplinks of one round (see `aggregate`).

        `consume`: `decoded` is a dict of fresh tensors that belongs to this call (the networked
        server's): it is emptied client by client, and a client's first estimator takes its tensors
        over instead of copying them, so no R_j outlives its application (BENCHMARKS.md, memory)."""
        if not decoded:
            return
        order = sorted(decoded)
        ef14 = self.cfg.method == "ef14"
        for i in range(len(self.specs)):
            acc = decoded[order[0]][i].clone()
            for j in order[1:]:
                acc.add_(decoded[j][i])
            if ef14:
                self.G[i] = acc.div_(len(order))
            else:
                self.G[i].add_(acc.div_(self.n))
        self.apply_estimators(decoded, consume)

    def apply_estimators(self, decoded: dict, consume: bool = False) -> None:
        """Every G_j of the round's clients (sorted) from their decoded R_j (`apply_decoded`'s second half)."""
        order = sorted(decoded)
        ef14 = self.cfg.method == "ef14"
        if self.estimators is None:
            if consume:
                decoded.clear()
            return
        for j in order:
            est = self.estimators.get(j)
            rj = decoded.pop(j) if consume else decoded[j]
            if est is None or ef14:
                if not consume:
                    self.estimators[j] = [r.clone() for r in rj]
                elif hasattr(self.estimators, "adopt"):
                    self.estimators.adopt(j, rj)
                else:
                    self.estimators[j] = list(rj)
            else:
                for e, r in zip(est, rj):
                    e.add_(r)
            del rj

    def register(self, inits: Mapping[int, Sequence[torch.Tensor] | None]) -> None:
        """Members joining a federation after its first round (the networked server's cohorts): client j's
        G_j is its initial estimator (`inits[j]`: the decoded g_j at the W it joined at, or None for
        init 'zero'), `n` becomes the number of members, and G is recomputed as mean_j G_j over all of
        them (sorted by id), so G == mean_j G_j holds over the new membership. Needs the estimators.
        With method 'ef14' G is this round's mean anyway: only `n` changes."""
        if self.estimators is None:
            raise ValueError("register needs the server's per-client estimators (keep_estimators=True)")
        for j in sorted(inits):
            if not 0 <= j < self.ids:
                raise ProtocolError(f"unknown client {j!r}: clients are 0..{self.ids - 1}")
            t = inits[j]
            self.estimators[j] = [torch.zeros_like(x) for x in self.X] if t is None else [x.clone() for x in t]
        self.n = len(self.estimators)
        if self.cfg.method == "ef14" or not self.n:
            return
        order = sorted(self.estimators)
        for i in range(len(self.specs)):
            acc = torch.zeros_like(self.G[i])
            for j in order:
                acc.add_(self.estimators[j][i].to(acc.dtype))
            self.G[i] = acc.div_(self.n)

    # ------------------------------------------------------------------ LMO step + downlink
    def step_sizes(self, directions: Sequence[torch.Tensor], G: Sequence[torch.Tensor], t: float,
                   layers: Sequence[int] | None = None, nuclear: float | None = None) -> list[float]:
        """Per-layer t_i for this step, from the preset (docs/design.md §3), for `layers` (default all;
        `directions` and `G` are those layers'). MuonMax scales by the previous step's sum of nuclear
        norms (`stale_nuclear`, which `step` updates), on the first step by this step's over all layers
        (`nuclear` when the caller has summed it already)."""
        cfg = self.cfg
        specs = self.specs if layers is None else [self.specs[i] for i in layers]
        mult = [float(cfg.lr_mult.get(s.norm, s.lr_mult)) for s in specs]
        if cfg.preset == "gluon":
            # Gluon's layer-wise adaptive step t_i = ||G_i||_* / (L0 + L1 ||G_i||_*), times the schedule.
            out = []
            for g, d, s, m in zip(G, directions, specs, mult):
                dn = dual_norm(g, s, direction=d)
                out.append(t * m * dn / (cfg.gluon_l0 + cfg.gluon_l1 * dn))
            return out
        if cfg.preset in MUONMAX:
            # MuonMax: every layer's step is scaled by the sum of nuclear norms (the dual of the max-norm
            # over layers). Stale trick: use the sum from the previous step, fresh only on the first.
            scale = self.stale_nuclear
            if scale is None:
                if layers is not None and len(layers) != len(self.specs):
                    raise ValueError("the first MuonMax step needs every layer's direction at once")
                scale = self._nuclear_sum(directions, G, specs) if nuclear is None else nuclear
            if self.momo is not None:
                t = self.momo_step(t, scale)
            return [t * m * scale for m in mult]
        return [t * m for m in mult]

    @staticmethod
    def _nuclear_sum(directions, G, specs, start: float = 0.0) -> float:
        """`start` + the nuclear norms of the spectral layers, added one by one in the order given."""
        total = start
        for g, d, s in zip(G, directions, specs):
            if s.norm == "spectral":
                total += dual_norm(g, s, direction=d)
        return total

    # Newton-Schulz batches all same-shape matrices of one lmo_all call: stacked input, two iterates
    # and the directions, ~3.5 copies of what it is given. `step` therefore hands it the layers in
    # blocks of at most this share of the model (BENCHMARKS.md, memory) ...
    LMO_BLOCK_FRACTION = 1 / 8
    # ... but never blocks below this size, where the per-call cost would start to show.
    LMO_BLOCK_MIN_BYTES = 4 << 20

    def lmo_blocks(self) -> list[list[int]]:
        """The layer blocks `step` takes the LMO of, one `lmo_all` call each.

        A model of at most max(LMO_BLOCK_MIN_BYTES, LMO_BLOCK_FRACTION x model) bytes is one block (one
        call, as before blocks existed); larger ones are cut into consecutive blocks of about that size.
        Matrices that `lmo_all` zero-pads into one batch (`spectral_groups`) stay in one block (split,
        the padded shape and with it the rounding could change); same-shape matrices may be split, each
        is its own product in a batch. The first MuonMax step needs every direction at once."""
        if self.cfg.preset in MUONMAX and self.stale_nuclear is None:
            return [list(range(len(self.specs)))]
        return lmo_blocks(self.specs, [4 * x.numel() for x in self.X], self.LMO_BLOCK_MIN_BYTES,
                          self.LMO_BLOCK_FRACTION)

    def step(self) -> list[bytes]:
        """One server step: X += t lmo(G); frames = C_down(X - W); W += decode(frames). Returns the frames.

        Layer block by layer block (`lmo_blocks`): each block's directions are used and freed before
        the next block's are computed, so the step holds only a block's LMO temporaries."""
        k = self.round + 1
        t = lr_at(self.cfg, k)
        G = self.G
        if self.ef14_buffer is not None:
            G = [g + b for g, b in zip(G, self.ef14_buffer)]
        wd = self.cfg.weight_decay
        muonmax = self.cfg.preset in MUONMAX
        if self.momo is not None:
            self._momo_xg = self._dot(self.X, self.G)
        frames: list = [None] * len(self.specs)
        if self.adam is not None:
            for i in range(len(self.specs)):
                frames[i] = self._update_layer(i, k, t, self._adam_direction(i, k, G[i]), t, wd)
            self.round = k
            return frames
        nuclear = 0.0
        for block in self.lmo_blocks():
            Gb, specs = [G[i] for i in block], [self.specs[i] for i in block]
            directions = lmo_all(Gb, specs, ns_steps=self.cfg.ns_steps, coeffs=self.cfg.ns_coeffs,
                                 threads=self.block_threads(specs))
            if muonmax:
                nuclear = self._nuclear_sum(directions, Gb, specs, nuclear)
            ts = self.step_sizes(directions, Gb, t, block, nuclear if muonmax else None)
            for j, i in enumerate(block):
                d, directions[j] = directions[j], None
                frames[i] = self._update_layer(i, k, t, d, ts[j], wd)
                del d
            del directions, Gb
        if muonmax:
            self.stale_nuclear = nuclear
        if self.momo is not None:
            self.momo["wg"] = self._dot(self.W, self.G)
        self.round = k
        return frames

    def block_threads(self, specs: Sequence[LayerSpec]) -> int:
        """The threads of one block's lmo_all call (`lmo_threads`, or `lmo_all`'s own choice for its work):
        the pipelined step (common.pipeline) gives each unit of a block its block's count."""
        return self.cfg.lmo_threads or lmo_all_threads(specs, self.cfg.ns_steps)

    def _update_layer(self, i: int, k: int, t: float, d: torch.Tensor, ti: float, wd: float,
                      X: torch.Tensor | None = None, W: torch.Tensor | None = None) -> bytes:
        """Layer i of step k: X_i += t_i d (+ decay), its downlink frame, W_i += decode(frame).
        `X`, `W`: update these (copies of X_i and W_i, the pipelined step's) instead of X_i and W_i."""
        if self._airbench:
            update = d.mul(ti)
            if wd:
                update.sub_(self.X[i], alpha=t * wd)
            frame = self.down[i].encode(update, frame_seed(self.cfg.seed, DOWN, k, self.layer_ids[i]))
            q = self.down[i].decode(frame, self.specs[i].shape, device=self.device)
            self.X[i].add_(q)
            self.W[i].add_(q)
            if ti > 0:
                self.ef14_buffer[i].mul_(self.cfg.ef14_decay).add_((update - q) / ti, alpha=1 - self.cfg.ef14_decay)
            return frame
        X = self.X[i] if X is None else X
        W = self.W[i] if W is None else W
        if wd:
            X.mul_(1.0 - t * wd)
        X.add_(d, alpha=ti)
        frame = self.down[i].encode(X - W, frame_seed(self.cfg.seed, DOWN, k, self.layer_ids[i]))
        W.add_(self.down[i].decode(frame, self.specs[i].shape, device=self.device))
        return frame


class WorkerState:
    """Worker side of EF21-Muon: W (identical bits to the server's), momentum M_j, estimator G_j."""

    def __init__(self, params: Sequence[torch.Tensor], specs: Sequence[LayerSpec], cfg: RunConfig,
                 client_id: int, device: str | torch.device = "cpu", copy: bool = True):
        """`copy=False`: W takes over `params` (float32 tensors on `device` are used as they are, not
        cloned); for a caller that owns them, e.g. the worker's W decoded from the Join reply."""
        self.cfg, self.specs, self.client = cfg, list(specs), int(client_id)
        self.device = torch.device(device)
        self.W = [p.detach().to(self.device, torch.float32) for p in params] if not copy else \
            [p.detach().to(self.device, torch.float32).clone() for p in params]
        self.M = [torch.zeros_like(w) for w in self.W]
        self.Gj = [torch.zeros_like(w) for w in self.W]
        self.error = [torch.zeros_like(w) for w in self.W] if cfg.method == "ef14" else None
        self.round = 0  # number of downlinks applied
        self.up = layer_compressors(specs, cfg.uplink, cfg.uplink_layers)
        self.down = layer_compressors(specs, cfg.downlink, cfg.downlink_layers)
        if cfg.method == "ef14" and cfg.ef14_variant == "airbench":
            bits = cfg.ef14_bits
            self.down = [parse_spec("identity") if bits == 32 else parse_spec(f"quant:{bits}:{max(1, w.numel())}")
                         for w in self.W]

    def _check_grads(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(grads) != len(self.W):
            raise ValueError(f"expected {len(self.W)} gradients, got {len(grads)}")
        out = []
        for g, w, s in zip(grads, self.W, self.specs):
            if g is None:
                g = torch.zeros_like(w)
            if tuple(g.shape) != tuple(w.shape):
                raise ValueError(f"gradient of {s.name} has shape {tuple(g.shape)}, expected {tuple(w.shape)}")
            if not all_finite(g):
                raise ValueError(f"gradient of {s.name} has NaN/Inf entries at round {self.round}: the loss "
                                 f"diverged or the data holds non-finite values (try a smaller --lr)")
            out.append(g.detach().to(self.device, torch.float32))
        return out

    def init_uplink(self, grads: Sequence[torch.Tensor], consume: bool = False) -> list[bytes]:
        """'grad' initialisation: G_j = M_j = g_j(X_0); returns the uncompressed frames to send once.
        `consume`: `grads` is a list this call empties, freeing each gradient once it is encoded."""
        checked = self._check_grads(grads)
        if consume and isinstance(grads, list):
            grads.clear()
        ident = _identity()
        frames = []
        for i, s in enumerate(self.specs):
            f = ident.encode(checked[i], 0)
            checked[i] = None
            g = ident.decode(f, s.shape, device=self.device)
            self.M[i] = g.clone()
            self.Gj[i] = g
            frames.append(f)
        return frames

    def apply_downlink(self, frames: Sequence, consume: bool = False) -> None:
        """W <- W + S. Decodes every layer before touching W, so a bad frame changes nothing.
        `consume`: `frames` is a list whose entries are dropped as they are decoded (their buffers freed)."""
        if len(frames) != len(self.specs):
            raise FrameError(f"downlink: expected {len(self.specs)} layer frames, got {len(frames)}")
        drop = consume and isinstance(frames, list)
        S = []
        for i in range(len(self.specs)):
            f = frames[i]
            if drop:
                frames[i] = None
            S.append(self.decode_downlink(i, f))
            del f
        self.add_downlink(S)

    def decode_downlink(self, i: int, frame) -> torch.Tensor:
        """S_i, layer i's downlink frame decoded (a FrameError if it is bad); nothing changes."""
        return self.down[i].decode(frame, self.specs[i].shape, device=self.device)

    def add_downlink(self, S: Sequence[torch.Tensor]) -> None:
        """W <- W + S for S decoded layer by layer (`decode_downlink`): `apply_downlink`'s second half."""
        for w, s in zip(self.W, S, strict=True):
            w.add_(s)
        self.round += 1

    def make_uplink(self, grads: Sequence[torch.Tensor], consume: bool = False) -> list[bytes]:
        """M_j <- (1-beta) M_j + beta g; R_j = C_up(M_j - G_j); G_j += R_j. Returns R_j's frames.
        `consume`: `grads` is a list this call empties, freeing each gradient once it is used."""
        checked = self.checked_gradients(grads, consume)
        return [self.uplink_frame(i, checked.pop(0)) for i in range(len(self.specs))]

    def checked_gradients(self, grads: Sequence[torch.Tensor], consume: bool = False) -> list[torch.Tensor]:
        """The gradients `make_uplink` takes, checked (shapes, finite) and as float32 on this device.
        `consume`: `grads` is a list this call empties."""
        checked = self._check_grads(grads)
        if consume and isinstance(grads, list):
            grads.clear()
        return checked

    def uplink_frame(self, i: int, g: torch.Tensor) -> bytes:
        """Layer i of `make_uplink` (round `self.round`): M_i <- (1-beta) M_i + beta g, the frame of
        R_i = C_up(M_i - G_i), G_i += R_i. The layers are independent: called once per layer, in any order,
        it computes `make_uplink`'s bits (worker.uplink encodes them lazily while the stream is sent)."""
        comp, s = self.up[i], self.specs[i]
        beta = float(self.cfg.beta)
        self.M[i].mul_(1.0 - beta).add_(g, alpha=beta)
        del g
        seed = frame_seed(self.cfg.seed, UP, self.round, i, self.client)
        if self.error is not None:  # ef14: send C(M + e), keep the residual
            v = self.M[i] + self.error[i]
            frame = comp.encode(v, seed)
            r = comp.decode(frame, s.shape, device=self.device)
            self.error[i] = v.sub_(r)
            self.Gj[i] = r
        else:
            frame = comp.encode(self.M[i] - self.Gj[i], seed)
            self.Gj[i].add_(comp.decode(frame, s.shape, device=self.device))
        return frame

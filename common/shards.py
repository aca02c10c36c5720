"""Sharded servers (docs/design.md §6.3): which layers each of N server processes owns, as BytePS shards a
parameter server, and what a sharded run refuses.

`shard_layers(specs, n)` is a pure function of the model's layer specs and N, the same on every process
(server and worker): a greedy cut (longest processing time first) of the layers into N sets of about
equal cost, where a layer's cost is its Newton-Schulz FLOPs per step (`ns_steps` steps, spectral layers)
plus `BYTE_COST` per byte of the layer (the decode, aggregate, encode and transfer work every layer
has). Spectral matrices that `lmo_all` zero-pads into one Newton-Schulz batch (`spectral_groups`) stay in
one shard, as `ServerState.lmo_blocks` keeps them in one block. Every layer lands in exactly one shard,
every shard holds at least one layer, and a shard's layers are listed in the model's (global) order.

No torch here: the CLI checks `--shard I/N` before anything heavy loads.
"""
from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError

# a byte of a layer costs about this many FLOPs of server work besides Newton-Schulz (decode the n uplinks,
# sum them, encode and decode the downlink: a few passes over the layer per client): enough that a shard
# of embeddings and biases is not seen as free
BYTE_COST = 16

__all__ = ["BYTE_COST", "check_shardable", "layer_costs", "layer_units", "parse_shard", "parse_shard_count", "shard_layers"]


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (--shard) -> (I, N) with 0 <= I < N; a ConfigError saying what was wrong otherwise."""
    i, sep, n = str(text).strip().partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit():
        raise ConfigError(f"--shard {text!r} is not I/N: give this server's shard index and the number of "
                          "shards, e.g. --shard 0/2 and --shard 1/2 for two servers")
    index, count = int(i), int(n)
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {text!r}: the index must be 0..N-1 and N >= 1 (e.g. 0/2, 1/2)")
    return index, count


def parse_shard_count(value) -> int:
    """--shards N (efmuon run): an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--shards {value!r} is not a count: give an integer >= 1 (1: one server)")
    return value


def check_shardable(cfg) -> None:
    """Refuse what a sharded run cannot do exactly: cohort rounds (a later issue combines them) and
    presets whose step needs a quantity of the whole model (MuonMax's sum of nuclear norms)."""
    from .federation import COHORT_KEYS, runs_cohorts  # lazy: federation loads the task registry

    if runs_cohorts(cfg):
        given = [k for k in COHORT_KEYS if getattr(cfg, k, None) is not None]
        raise ConfigError(f"sharded servers (--shard/--shards) run synchronous rounds only; this run sets cohort "
                          f"settings ({', '.join(given)}): drop them, or run one server")
    if cfg.preset == "muonmax":
        raise ConfigError("--preset muonmax scales every layer's step by the sum of the nuclear norms over the "
                          "whole model, which no shard holds: run muonmax on one server, or pick muon, scion or "
                          "gluon (layer-wise) for sharded servers")


def layer_costs(specs: Sequence, ns_steps: int = 5) -> list[int]:
    """Each layer's cost for the cut (module docstring): Newton-Schulz FLOPs + BYTE_COST * bytes."""
    from .lmo.batching import ns_step_flops  # lazy: the lmo package imports torch
    from .lmo.norms import matrix_dims  # lazy: torch

    out = []
    for s in specs:
        numel = 1
        for d in s.shape:
            numel *= int(d)
        flops = ns_steps * ns_step_flops(*matrix_dims(s.shape)) if s.norm == "spectral" and numel else 0
        out.append(int(flops + BYTE_COST * 4 * numel))
    return out


def layer_units(specs: Sequence) -> list[list[int]]:
    """Layers that must share a shard: each padded Newton-Schulz batch together, every other layer alone."""
    from .lmo.batching import spectral_groups  # lazy: torch
    from .lmo.norms import matrix_dims  # lazy: torch

    spectral = [i for i, s in enumerate(specs) if s.norm == "spectral" and all(int(d) for d in s.shape)]
    units, taken = [], set()
    for g in spectral_groups([matrix_dims(specs[i].shape) for i in spectral]):
        if g.padded:
            members = [spectral[j] for j in g.idx]
            units.append(sorted(members))
            taken.update(members)
    units.extend([i] for i in range(len(specs)) if i not in taken)
    return sorted(units, key=min)


def shard_layers(specs: Sequence, n: int, ns_steps: int = 5) -> list[list[int]]:
    """The global layer indices each of `n` shards owns (module docstring), shard by shard."""
    n = parse_shard_count(n)
    units = layer_units(specs)
    if n > len(units):
        raise ConfigError(f"{n} shards for a model of {len(specs)} layers ({len(units)} that can be split): "
                          f"give at most {len(units)} shards")
    cost = layer_costs(specs, ns_steps)
    order = sorted(units, key=lambda u: (-sum(cost[i] for i in u), min(u)))
    load, owned = [0] * n, [[] for _ in range(n)]
    for u in order:
        # the lightest shard; on a tie one that holds nothing yet, then the lowest index
        target = min(range(n), key=lambda s: (load[s], bool(owned[s]), s))
        owned[target].extend(u)
        load[target] += sum(cost[i] for i in u)
    return [sorted(o) for o in owned]

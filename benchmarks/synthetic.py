"""The synthetic model of the service benchmarks: spectral 256x1024 matrices, a loss whose gradient
is the parameters themselves, its run config and precomputed uplink frames."""
from __future__ import annotations

import torch

from ..common.algorithm import frame_seed, layer_compressors
from ..common.config import RunConfig
from ..common.lmo import assign_norms
from ..common.wire import chunking, protocol
from ..v1 import service_pb2 as pb

LAYER_SHAPE = (256, 1024)  # 262,144 parameters per layer, spectral norm (Newton-Schulz on 256x1024)


def synthetic_layers(params: int) -> list[tuple[str, tuple[int, ...]]]:
    """~`params` parameters as spectral 256x1024 matrices (the remainder as one smaller matrix)."""
    per = LAYER_SHAPE[0] * LAYER_SHAPE[1]
    full, rest = divmod(int(params), per)
    shapes = [LAYER_SHAPE] * full
    if rest >= 1024:
        shapes.append((rest // 1024, 1024))
    return [(f"layers.{i}", s) for i, s in enumerate(shapes)]


def synthetic_config(workers: int, rounds: int, uplink: str, downlink: str, init: str):

    return RunConfig(task="lsq", workers=workers, rounds=rounds, uplink=uplink, downlink=downlink, init=init,
                     lr=0.01, beta=0.1, schedule="constant", warmup=0, preset="muon", eval_every=10 ** 9,
                     threads=1)


class _Synth(torch.nn.Module):
    def __init__(self, layers, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _, s in layers])


class SyntheticModule:
    """nn.Module factory whose parameters are named like `synthetic_layers` (layers.0, layers.1, ...)."""

    @staticmethod
    def build(layers, seed: int = 0) -> torch.nn.Module:
        return _Synth(layers, seed)

    @staticmethod
    def loss(model, batch):
        # 0.5 sum p^2: the gradient is p itself (autograd keeps no extra copy of the model)
        return sum(0.5 * (p * p).sum() for p in model.parameters())


def uplink_frames(params: int, uplink: str) -> list[bytes]:
    """One client's uplink frames for the synthetic model (the same for every client and round)."""
    layers = synthetic_layers(params)
    comps = layer_compressors(assign_norms(layers), uplink, {})
    g = torch.Generator().manual_seed(3)
    return [c.encode(torch.randn(s, generator=g) * 1e-3, frame_seed(0, 0, 1, i))
            for i, (c, (_, s)) in enumerate(zip(comps, layers))]


def uplink_messages(params: int, uplink: str, init: str, layer_ids=None):
    """Precomputed uplink Submission chunk messages (the same frames for every client; the server
    decodes each client's copy separately): (messages_for(round) -> (lengths, chunks), the model's
    fingerprint, payload bytes per submission). `layer_ids`: a shard's layers only."""
    layers = synthetic_layers(params)
    frames = uplink_frames(params, uplink)
    if layer_ids is not None:  # a shard's layers (common.shards): its frames and its fingerprint
        layers, frames = [layers[i] for i in layer_ids], [frames[i] for i in layer_ids]
    chunks = [pb.Submission(chunk=c) for c in chunking.iter_chunks(frames)]
    lengths = [len(f) for f in frames]
    payload = sum(lengths)

    def messages_for(k):
        if k == 0 and init == "zero":
            return [], []
        return lengths, chunks
    fp = protocol.fingerprint([n for n, _ in layers], [torch.empty(s) for _, s in layers])
    return messages_for, fp, payload

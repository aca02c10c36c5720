"""A 300 MB model (75M float32 parameters) goes through gRPC in 1 MiB chunks: Join (initial W),
the round-0 gradients, one downlink and one uplink, with identity compression. The report shows
its bytes at all three levels."""
from __future__ import annotations

import asyncio
import gc

import pytest
import torch
from efmuon.common.config import RunConfig, resolve
from efmuon.common.model import model_specs, parameters_of
from efmuon.server import service
from efmuon.server.coordinator import Coordinator, ServerModel
from efmuon.worker import Worker
from torch import nn

PARAMS = 75_000_000  # 300 MB of float32
LAYERS = 3


class Big(nn.Module):
    """Three 1-D parameters (bias-RMS LMO: the server's step costs a few passes over memory)."""

    def __init__(self):
        super().__init__()
        self.p = nn.ParameterList([nn.Parameter(torch.full((PARAMS // LAYERS,), 0.5 + i)) for i in range(LAYERS)])


def loss_fn(model: Big, batch) -> torch.Tensor:
    # 0.5 ||p - batch||^2 per layer: the gradient is p - batch
    return sum(0.5 * (p - batch).square().sum() for p in model.p)


@pytest.mark.slow
async def test_a_300_megabyte_model_completes_a_round_through_grpc():
    # Prepare
    cfg = resolve(RunConfig(task="lsq", workers=1, rounds=1, lr=0.01, beta=1.0, schedule="constant", warmup=0,
                            preset="muon", uplink="identity", downlink="identity"), {})
    model = Big()
    names, params = parameters_of(model)
    coordinator = Coordinator(cfg, ServerModel(names, params, model_specs(model, cfg)), quiet=True, leave_timeout=10)
    del params
    server, port = await service.start(coordinator)
    worker = Worker(model, loss_fn, lambda k: 0.25 * k, server=f"127.0.0.1:{port}", client_id=0,
                    configure_threads=False)
    try:
        # Execute
        stats = await asyncio.to_thread(worker.run)
        await asyncio.wait_for(coordinator.finished.wait(), 60)
    finally:
        await server.stop(0)
        coordinator.executor.shutdown(wait=True)
    report = coordinator.report.to_dict()
    summary, (round1,) = report["summary"], report["rounds"]
    sha_server = summary["w_sha256"]
    del coordinator, worker, model
    gc.collect()

    # Assert
    full = 4 * PARAMS
    assert summary["init_bytes"]["down"]["payload"] == full  # the initial W, raw
    assert round1["bytes"]["down"]["payload"] >= full  # S_1: identity frames (header + 4 B per entry)
    assert round1["bytes"]["up"]["payload"] >= full
    for where in (summary["init_bytes"], round1["bytes"]):
        for d in ("up", "down"):
            b = where[d]
            assert b["wire"] >= b["message"] >= b["payload"] >= full, (d, b)
            # ~1 MiB per message: protobuf adds a few bytes per chunk; the transport adds at least the
            # gRPC length prefix (5 B) and an HTTP/2 DATA frame header (9 B) per message
            assert b["message"] - b["payload"] < 0.001 * full
            assert b["wire"] - b["message"] >= 14 * (b["payload"] // (1 << 20))
    assert stats["w_sha256"] == sha_server

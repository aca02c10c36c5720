"""`Coordinator.events`, the timing hook the benchmarks use: which events a run reports, for which
rounds, and in which order (timestamps are compared with each other, never with a duration)."""
from __future__ import annotations

import asyncio
from collections import Counter

from efmuon.common.config import RunConfig, resolve
from efmuon.common.model import model_specs, parameters_of
from efmuon.server import service
from efmuon.server.coordinator import Coordinator, ServerModel
from conftest import batches_of, loss_fn, tiny_model
from efmuon.worker import Worker


async def test_events_report_each_submission_each_round_and_each_reply_in_order():
    # Prepare
    cfg = resolve(RunConfig(task="lsq", workers=2, rounds=3, lr=0.05, beta=0.3, schedule="constant", warmup=0,
                            preset="muon", uplink="topk:0.5", downlink="topk:0.5"), {})
    model = tiny_model()
    names, params = parameters_of(model)
    c = Coordinator(cfg, ServerModel(names, params, model_specs(model, cfg)), quiet=True, leave_timeout=5)
    assert c.events is None
    seen: list[tuple[str, int, float, float]] = []
    c.events = lambda what, k, t0, t1: seen.append((what, k, t0, t1))
    server, port = await service.start(c)
    try:
        # Execute
        workers = [Worker(tiny_model(), loss_fn, batches_of(j), server=f"127.0.0.1:{port}", client_id=j,
                          configure_threads=False) for j in range(2)]
        await asyncio.gather(*(asyncio.to_thread(w.run) for w in workers))
        await asyncio.wait_for(c.finished.wait(), 60)
    finally:
        await server.stop(0)
        c.executor.shutdown(wait=True)

    # Assert: rounds 0..R each have 2 submissions received and decoded, one processing, 2 replies streamed;
    # rounds 0..R-1 a step (S_{k+1})
    rounds = range(cfg.rounds + 1)
    expected = {("recv", k): 2 for k in rounds} | {("decode", k): 2 for k in rounds} | \
        {("process", k): 1 for k in rounds} | {("record_down", k): 2 for k in rounds} | \
        {("step", k): 1 for k in range(cfg.rounds)}
    assert Counter((what, k) for what, k, _, _ in seen) == expected
    assert all(t0 <= t1 for _, _, t0, t1 in seen)
    assert all(t0 == t1 for what, _, t0, t1 in seen if what == "record_down")
    for k in rounds:
        (p0, p1), = [(t0, t1) for what, r, t0, t1 in seen if what == "process" and r == k]
        assert all(t1 <= p0 for what, r, _, t1 in seen if what == "recv" and r == k)  # received, then processed
        assert all(t1 <= p0 for what, r, _, t1 in seen if what == "decode" and r == k)  # decoded before it too
        assert all(p0 <= t0 and t1 <= p1 for what, r, t0, t1 in seen if what == "step" and r == k)  # inside it
        assert all(t0 >= p1 for what, r, t0, _ in seen if what == "record_down" and r == k)  # then streamed
    recvs = sorted(t1 for what, _, _, t1 in seen if what == "recv")
    decodes = sorted(t0 for what, _, t0, _ in seen if what == "decode")
    assert all(d >= r for r, d in zip(recvs, decodes))  # each decode starts after its submission was received

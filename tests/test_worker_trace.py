"""`Worker.trace`: the hook the memory benchmark reads the RSS in, called once after each step of the
loop, in the loop's order, against a real in-process server (the harness of test_service_protocol)."""
from __future__ import annotations

import asyncio

import pytest
from efmuon.worker import Worker
from test_service_protocol import Harness, make_cfg, reference_w, run_workers


def expected_steps(rounds: int, init: str) -> list[str]:
    """join; the initial submission (a gradient only for init 'grad'); then per round the downlink
    S_k, the gradient at W_k and the uplink; the last exchange is answered 'done'."""
    steps = ["join"] + (["gradients", "init_uplink"] if init == "grad" else []) + ["exchange"]
    for _ in range(rounds):
        steps += ["apply_downlink", "gradients", "make_uplink", "exchange"]
    return steps


@pytest.mark.parametrize("init", ["grad", "zero"])
async def test_a_worker_with_trace_set_records_its_steps_in_order(init):
    # Prepare
    cfg = make_cfg(workers=2, rounds=3, init=init)
    async with Harness(cfg) as h:
        traced, plain = h.worker(0), h.worker(1)
        assert traced.trace is None and plain.trace is None  # off by default
        steps: list[str] = []
        traced.trace = steps.append  # set after construction

        # Execute
        stats = await run_workers(traced, plain)
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)

    # Assert
    assert steps == expected_steps(cfg.rounds, init)
    assert plain.trace is None and Worker.trace is None  # set on one instance only
    expected = reference_w(cfg)  # tracing changes nothing
    assert [s["w_sha256"] for s in stats] == [expected, expected]

"""`--pipeline` on a real server over gRPC: the server steps an LMO unit before the round's last uplink
frame has arrived, ends in the bits of the sequential server, and refuses a bad frame mid-submission
with INVALID_ARGUMENT, changing nothing."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import torch
from torch import nn

from efmuon.common.compress import parse_spec
from efmuon.common.model import model_specs, parameters_of
from efmuon.common.wire import chunking
from efmuon.server import service
from efmuon.server.coordinator import Coordinator, ServerModel, ServerOptions
from efmuon.v1 import service_pb2 as pb
from efmuon.worker import Worker
from efmuon.worker.connection import Connection
from conftest import Harness, efmuon_cli, make_cfg

WIDTH = 384  # 3 matrices of 576 KiB: an identity uplink spans several 1 MiB chunks


def wide() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                         nn.Linear(WIDTH, WIDTH))


def wide_loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def wide_batches(j: int):
    def batch(k: int):
        g = torch.Generator().manual_seed(1000 * j + k)
        return torch.randn(8, WIDTH, generator=g), torch.randn(8, WIDTH, generator=g)
    return batch


async def serve_run(cfg, pipeline: bool, link: str | None):
    model = wide()
    names, params = parameters_of(model)
    c = Coordinator(cfg, ServerModel(names, params, model_specs(model, cfg)), quiet=True, leave_timeout=5,
                    options=ServerOptions(pipeline=pipeline))
    seen: list[tuple[str, int, float, float]] = []
    c.events = lambda what, k, t0, t1: seen.append((what, k, t0, t1))
    server, port = await service.start(c)
    try:
        workers = [Worker(wide(), wide_loss, wide_batches(j), client_id=j, configure_threads=False,
                          server=Connection(f"127.0.0.1:{port}", link=link if j == cfg.workers - 1 else None))
                   for j in range(cfg.workers)]
        await asyncio.gather(*(asyncio.to_thread(w.run) for w in workers))
        await asyncio.wait_for(c.finished.wait(), 60)
    finally:
        await server.stop(0)
        c.executor.shutdown(wait=True)
    return c, seen


@pytest.mark.slow
async def test_server_steps_a_unit_before_the_last_frame_arrives_and_keeps_the_bits():
    cfg = make_cfg(workers=2, rounds=3, uplink="identity", downlink="topk:0.01")

    # Execute: the last worker's uplink is throttled (its relay emulates a 40 Mbit/s link)
    piped, seen = await serve_run(cfg, True, "up=40mbit")
    plain, seen_plain = await serve_run(cfg, False, None)

    # Assert: rounds 1..R-1 are pipelined; in each, a unit's LMO started before the round's last frame was in
    for k in range(1, cfg.rounds):
        units = [t0 for what, r, t0, _ in seen if what == "lmo_unit" and r == k]
        frames = [t for what, r, t, _ in seen if what == "frame" and r == k]
        assert len(frames) == 2 * 6 and len(units) >= 3
        assert min(units) < max(frames), k
    assert not any(what in ("lmo_unit", "frame") for what, *_ in seen_plain)
    assert not any(what == "lmo_unit" and r in (0, cfg.rounds) for what, r, *_ in seen)
    assert piped.report.summary["w_sha256"] == plain.report.summary["w_sha256"]
    assert piped.state_sha256() == plain.state_sha256()


async def test_a_bad_frame_mid_submission_is_refused_and_changes_nothing():
    cfg = make_cfg(workers=2, rounds=3, init="zero")
    async with Harness(cfg, options=ServerOptions(pipeline=True)) as h:
        c = h.coordinator
        heads = [await h.raw_join(j) for j in range(2)]
        await asyncio.gather(*(h.raw_exchange(j, heads[j].session, 0, []) for j in range(2)))
        assert c.collecting == 1
        before = c.state_sha256()
        comp = parse_spec("topk:0.5")
        shapes = [s.shape for s in c.model.specs]
        good = [comp.encode(torch.ones(s), 0) for s in shapes]
        bad = list(good)
        bad[1] = b"EF\x00garbage"

        # Execute
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.raw_exchange(0, heads[0].session, 1, bad)

        # Assert
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "layer 0.bias" in err.value.details() and "nothing was applied" in err.value.details()
        assert c.state_sha256() == before
        assert c._pipe is not None and c._pipe.have == [0] * len(shapes) and not c._pipe.done
        assert c.submitted == set()


def test_pipeline_asked_for_a_run_it_cannot_step_says_so_and_stays_sequential(caplog):
    cfg = make_cfg(workers=2, preset="muonmax")
    with caplog.at_level("WARNING", logger="efmuon.server"):
        h = Harness(cfg, options=ServerOptions(pipeline=True))
    c = h.coordinator
    c.executor.shutdown()
    assert "sum over all layers" in c.pipeline_off
    assert "--pipeline: this run's rounds stay sequential" in caplog.text
    assert c.pipeline_for(1) is None


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--task", "lsq", "--workers", "4", "--rounds", "6", "--uplink", "topk:0.1", "--downlink", "rankk:2"],
    ["--task", "lsq", "--workers", "3", "--rounds", "5", "--uplink", "quant:4", "--downlink", "natural"],
    ["--task", "gpt-char", "--workers", "3", "--rounds", "3", "--eval-every", "3", "--uplink", "rankk:2"],
], ids=["lsq-topk", "lsq-quant", "gpt-char-rankk"])
def test_run_pipeline_ends_in_the_bits_of_simulate(flags, tmp_path):
    """topk: the workers encode eagerly (data-dependent frame sizes); the others: lazily, gpt-char's frames
    in the pipelined step's unit order (worker.uplink). Without --pipeline the same equality is
    tests/test_service_e2e.py's and others'."""
    sim = efmuon_cli("simulate", *flags, "--report", str(tmp_path / "S.json"), "--plots", "none")
    assert sim.returncode == 0, sim.stderr
    want = json.loads((tmp_path / "S.json").read_text())["summary"]
    run = efmuon_cli("run", *flags, "--pipeline", "--report", str(tmp_path / "P.json"), "--plots", "none")
    assert run.returncode == 0, run.stderr
    got = json.loads((tmp_path / "P.json").read_text())["summary"]
    assert (got["w_sha256"], got["x_sha256"]) == (want["w_sha256"], want["x_sha256"])


async def _broken_round(pipeline: bool) -> tuple[str, str, int, list]:
    """Round 1: client 0 submits, client 1's stream breaks after part of its frames; the deadline proceeds."""
    cfg = make_cfg(workers=2, rounds=3, init="zero")
    async with Harness(cfg, options=ServerOptions(pipeline=pipeline, round_deadline=3.0,
                                                  on_deadline="proceed")) as h:
        c = h.coordinator
        seen: list = []
        stepped: list = []
        c.events = lambda what, k, t0, t1: seen.append((what, k))
        heads = [await h.raw_join(j) for j in range(2)]
        await asyncio.gather(*(h.raw_exchange(j, heads[j].session, 0, []) for j in range(2)))
        before = c.state_sha256()
        comp = parse_spec("topk:0.5")
        frames = [[comp.encode(torch.full(s.shape, float(j + 1)), 0) for s in c.model.specs] for j in range(2)]
        first = asyncio.ensure_future(h.raw_exchange(0, heads[0].session, 1, frames[0]))
        while 0 not in c.submitted:
            await asyncio.sleep(0.01)

        async def broken():
            fs = frames[1]
            yield pb.Submission(header=pb.SubmissionHeader(client_id=1, session=heads[1].session, round=1,
                                                           frame_lengths=[len(f) for f in fs]))
            yield pb.Submission(chunk=b"".join(fs[:2]))  # layers 0 and 1 whole
            for _ in range(200):  # the server has them (with --pipeline: and stepped layer 1's unit)
                if seen.count(("frame", 1)) == 6 and (not pipeline or c._pipe.done):
                    break
                await asyncio.sleep(0.01)
            stepped.append(bool(pipeline and c._pipe.done))
            raise RuntimeError("the worker died mid-stream")

        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):  # the call is cancelled locally
            [m async for m in h.stub.Exchange(broken())]
        if pipeline:  # client 1's frames, and the units stepped with them, are forgotten
            for _ in range(200):
                if c._pipe.have == [1] * len(frames[0]):
                    break
                await asyncio.sleep(0.01)
            assert c._pipe.have == [1] * len(frames[0]) and not c._pipe.done
        await asyncio.wait_for(first, 30)
        assert stepped == [pipeline]
        return before, c.state_sha256(), c.partial_rounds, seen


async def test_a_stream_broken_mid_round_leaves_no_trace_and_the_deadline_round_has_the_sequential_bits():
    before_p, after_p, partial_p, seen_p = await _broken_round(True)
    before_s, after_s, partial_s, _ = await _broken_round(False)

    assert before_p == before_s and after_p == after_s != before_p
    assert partial_p == partial_s == 1
    assert seen_p.count(("frame", 1)) == 4 + 2  # client 0's four frames, client 1's first two
    assert ("lmo_unit", 1) not in seen_p  # round 1 took the sequential path


async def _ordered_round(pipeline: bool, order: list[int] | None) -> str:
    """Round 1 of two raw clients whose frames travel in `order` (SubmissionHeader.frame_order)."""
    cfg = make_cfg(workers=2, rounds=3, init="zero")
    async with Harness(cfg, options=ServerOptions(pipeline=pipeline)) as h:
        c = h.coordinator
        heads = [await h.raw_join(j) for j in range(2)]
        await asyncio.gather(*(h.raw_exchange(j, heads[j].session, 0, []) for j in range(2)))
        comp = parse_spec("topk:0.5")
        frames = [[comp.encode(torch.full(s.shape, float(j + i + 1)), 0) for i, s in enumerate(c.model.specs)]
                  for j in range(2)]

        async def submit(j):
            sent = frames[j] if order is None else [frames[j][i] for i in order]

            def requests():
                yield pb.Submission(header=pb.SubmissionHeader(client_id=j, session=heads[j].session, round=1,
                                                               frame_lengths=[len(f) for f in sent],
                                                               frame_order=order or []))
                for chunk in chunking.iter_chunks(sent):
                    yield pb.Submission(chunk=chunk)
            return [m async for m in h.stub.Exchange(requests())]

        replies = await asyncio.gather(submit(0), submit(1))
        assert all(r[0].header.round == 2 and not r[0].header.resync for r in replies)
        return c.state_sha256()


async def test_frames_in_any_announced_order_give_the_bits_of_layer_order():
    want = await _ordered_round(False, None)
    assert await _ordered_round(False, [3, 1, 2, 0]) == want
    assert await _ordered_round(True, [3, 1, 2, 0]) == want
    assert await _ordered_round(True, None) == want


@pytest.mark.parametrize("order, words", [([0, 1, 2], "lists 3 layers"), ([0, 1, 2, 7], "outside 0..3"),
                                          ([0, 1, 1, 2], "more than once")])
async def test_a_bad_frame_order_is_refused_saying_what_is_wrong(order, words):
    cfg = make_cfg(workers=2, rounds=3, init="zero")
    async with Harness(cfg, options=ServerOptions(pipeline=True)) as h:
        c = h.coordinator
        heads = [await h.raw_join(j) for j in range(2)]
        await asyncio.gather(*(h.raw_exchange(j, heads[j].session, 0, []) for j in range(2)))
        before = c.state_sha256()

        def requests():
            yield pb.Submission(header=pb.SubmissionHeader(client_id=0, session=heads[0].session, round=1,
                                                           frame_lengths=[4, 4, 4, 4], frame_order=order))
            yield pb.Submission(chunk=b"\0" * 16)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            [m async for m in h.stub.Exchange(requests())]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        assert c.state_sha256() == before and c.submitted == set()

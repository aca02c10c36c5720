"""The worker's half of the pipelined round (worker.uplink): with a server that pipelines (`--pipeline`, its
Join reply says so) the worker encodes its uplink frames while the Exchange stream is sent, in the server's
LMO-unit order, and decodes the downlink frame by frame as it arrives, with the bits of the sequential
worker (make_uplink, then apply_downlink) - also across a connection cut mid-upload, and for a compressor
of data-dependent size (topk, encoded before sending)."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from efmuon.common.algorithm import ServerState, WorkerState
from efmuon.common.compress import parse_spec
from efmuon.common.errors import ProtocolError
from efmuon.common.model import Setup, model_specs, parameters_of
from efmuon.common.pipeline import PipelinedStep, uplink_order
from efmuon.server import service
from efmuon.server.coordinator import Coordinator, ServerModel, ServerOptions
from efmuon.worker import Worker, client as worker_client
from efmuon.worker.connection import Connection
from efmuon.worker.uplink import LazyUplink, fixed_lengths, lazy_uplink
from conftest import make_cfg
from test_pipeline_net import wide, wide_batches, wide_loss
from test_resilience import CuttableProxy

FIXED = ["identity", "identity:bf16", "identity:fp16", "natural", "quant:3:256", "quant:8", "sign", "sign:32",
         "randk:0.1", "randk:7", "rankk:2", "rankk:4+bf16", "randk:0.1+quant:8", "randk:0.3+natural"]


class Shape:
    def __init__(self, shape):
        self.shape = shape


@pytest.mark.parametrize("spec", FIXED)
def test_fixed_lengths_are_the_lengths_of_the_frames_encoded(spec):
    comp = parse_spec(spec)
    for shape in [(1,), (7,), (33, 17), (64, 64), (3, 5, 7), (0,), (2, 1)]:
        [n] = fixed_lengths([comp], [Shape(shape)])
        for scale in (0.0, 1e-3, 1.0, 1e6):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * scale
            assert len(comp.encode(x, 7)) == n, (spec, shape, scale)


def test_a_data_dependent_frame_size_has_no_fixed_lengths_and_is_encoded_eagerly():
    assert fixed_lengths([parse_spec("identity"), parse_spec("topk:0.1")], [Shape((4, 4))] * 2) is None
    cfg = make_cfg(workers=2, uplink="topk:0.1")
    st = Setup(cfg)
    state = WorkerState(st.params, st.specs, st.cfg, 0)
    frames = lazy_uplink(state, [torch.ones_like(p) for p in st.params], st.cfg)
    assert isinstance(frames, list) and len(frames) == len(st.params)


def test_uplink_order_is_the_order_the_pipelined_step_takes_its_units():
    cfg = make_cfg(workers=2, task="gpt-char")
    st = Setup(cfg)
    pipe = PipelinedStep(ServerState(st.params, st.specs, st.cfg, 2), range(2))
    order = uplink_order(st.specs, st.cfg)
    assert order == [i for layers, _ in pipe.units for i in layers]
    assert order != list(range(len(st.specs)))  # a padded unit whose layers are not adjacent
    assert uplink_order(st.specs, st.cfg.replace(preset="muonmax")) is None  # not pipelined: layer order


@pytest.mark.parametrize("method, uplink", [("ef21", "quant:3:256"), ("ef21", "rankk:2+bf16"), ("ef14", "natural")])
def test_a_lazy_uplink_in_any_order_has_the_bits_of_make_uplink(method, uplink):
    cfg = make_cfg(workers=2, task="gpt-char", method=method, uplink=uplink)
    st = Setup(cfg)
    eager, lazy = (WorkerState(st.params, st.specs, st.cfg, 1) for _ in range(2))
    for k in range(2):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i))
                 for i, p in enumerate(st.params)]
        want = eager.make_uplink([g.clone() for g in grads])
        seen = []
        up = LazyUplink(lazy, grads, uplink_order(st.specs, st.cfg), fixed_lengths(lazy.up, lazy.specs),
                        events=lambda what, r, t0, t1: seen.append((what, r)))
        assert grads == [] and seen == []  # the gradients are taken over; nothing is encoded yet
        positions = list(range(len(up)))
        random.Random(k).shuffle(positions)
        first = {s: up.frame(s) for s in positions[:4]}
        assert all(up.frame(s) is f for s, f in first.items())  # encoded once, then kept
        got = up.frames()
        assert got == [want[i] for i in up.layers] and seen == [("uplink_frame", k)] * len(up)
        for a, b in [(eager.M, lazy.M), (eager.Gj, lazy.Gj)] + ([(eager.error, lazy.error)] if method == "ef14" else []):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        S = [torch.randn(p.shape) * 1e-3 for p in st.params]
        frames = [c.encode(s, 3) for c, s in zip(eager.down, S)]
        eager.apply_downlink(list(frames))
        lazy.add_downlink([lazy.decode_downlink(i, f) for i, f in enumerate(frames)])
        assert all(torch.equal(x, y) for x, y in zip(eager.W, lazy.W)) and lazy.round == eager.round == k + 1
        up.release()
        with pytest.raises(ProtocolError, match="released"):
            up.frame(0)


async def wide_run(monkeypatch, cfg, pipeline: bool, eager: bool = False, cut_round: int | None = None):
    """A 2-worker run of the wide model (an identity uplink of several 1 MiB chunks) on an in-process server.
    `eager`: the workers encode every frame before sending (make_uplink, the worker before pipelining).
    `cut_round`: worker 1's connection is cut just before the first chunk of that round goes out."""
    if eager:
        monkeypatch.setattr(worker_client, "lazy_uplink", lambda state, g, cfg, events=None:
                            state.make_uplink(g, consume=True))
    model = wide()
    names, params = parameters_of(model)
    c = Coordinator(cfg, ServerModel(names, params, model_specs(model, cfg)), quiet=True, leave_timeout=5,
                    options=ServerOptions(pipeline=pipeline))
    server, port = await service.start(c)
    proxy = CuttableProxy(port) if cut_round is not None else None
    seen: list[tuple[str, int, float, float]] = []
    at_cut: list[int] = []

    def events(what, k, t0, t1):
        seen.append((what, k, t0, t1))
        if what == "uplink_chunk" and k == cut_round and not at_cut:
            at_cut.append(sum(1 for e in seen if e[:2] == ("uplink_frame", k)))
            proxy.cut()

    try:
        workers = [Worker(wide(), wide_loss, wide_batches(j), client_id=j, configure_threads=False,
                          reconnect_timeout=30,
                          server=Connection(f"127.0.0.1:{proxy.port if proxy and j == 1 else port}"))
                   for j in range(cfg.workers)]
        workers[1].events = events
        stats = await asyncio.gather(*(asyncio.to_thread(w.run) for w in workers))
        await asyncio.wait_for(c.finished.wait(), 60)
    finally:
        if proxy is not None:
            proxy.close()
        await server.stop(0)
        c.executor.shutdown(wait=True)
    return c, stats, seen, at_cut, workers


async def test_the_worker_sends_its_first_frames_before_it_has_encoded_the_last_and_keeps_the_bits(monkeypatch):
    cfg = make_cfg(workers=2, rounds=3, uplink="identity", downlink="quant:8")
    ref, ref_stats, *_ = await wide_run(monkeypatch, cfg, True, eager=True)
    monkeypatch.undo()

    c, stats, seen, _, workers = await wide_run(monkeypatch, cfg, True)
    plain, plain_stats, plain_seen, _, plain_workers = await wide_run(monkeypatch, cfg, False)

    # Assert: with --pipeline (the Join reply says so) the worker pipelines, with a sequential server it does not
    assert workers[1].pipelined and not plain_workers[1].pipelined
    n = len(workers[1].state.W)
    for k in range(1, cfg.rounds + 1):
        encoded = [t1 for what, r, _, t1 in seen if what == "uplink_frame" and r == k]
        chunks = [t for what, r, t, _ in seen if what == "uplink_chunk" and r == k]
        assert len(encoded) == n and len(chunks) >= 2, k
        assert min(chunks) < max(encoded), k  # frame 0 went to gRPC before the last frame was encoded
    assert sum(1 for what, *_ in seen if what == "downlink_frame") == n * cfg.rounds
    assert not any(what in ("uplink_frame", "downlink_frame") for what, *_ in plain_seen)
    want = ref.report.summary["w_sha256"]
    for run, st in [(ref, ref_stats), (c, stats), (plain, plain_stats)]:
        assert run.report.summary["w_sha256"] == want and [s["w_sha256"] for s in st] == [want, want]
        assert run.state_sha256() == ref.state_sha256()


async def test_a_connection_cut_mid_upload_resends_the_same_frames_and_keeps_the_bits(monkeypatch):
    cfg = make_cfg(workers=2, rounds=4, uplink="identity", downlink="quant:8")
    K = 2
    ref, *_ = await wide_run(monkeypatch, cfg, True, eager=True)
    monkeypatch.undo()

    c, stats, seen, at_cut, workers = await wide_run(monkeypatch, cfg, True, cut_round=K)

    w1, n = workers[1], len(workers[1].state.W)
    assert w1.reconnects == 1 and w1.resyncs == 0
    assert at_cut and 0 < at_cut[0] < n  # the cut came with part of round K's frames still unencoded
    for k in range(1, cfg.rounds + 1):  # every frame encoded exactly once, the resent round K included
        assert sum(1 for what, r, *_ in seen if what == "uplink_frame" and r == k) == n, k
    want = ref.report.summary["w_sha256"]
    assert c.report.summary["w_sha256"] == want and [s["w_sha256"] for s in stats] == [want, want]
    assert c.state_sha256() == ref.state_sha256()

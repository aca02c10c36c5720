"""The service's edges, with a real grpc.aio server in the test's event loop on 127.0.0.1 (port 0)
and `Worker`s (sync gRPC) in threads: refusals, duplicates, bad frames, Status during a round, and
the Worker API matching the core round bit for bit (wire figures: test_wire_bytes.py)."""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from conftest import Harness, batches_of, loss_fn, make_cfg, reference_w, run_workers, server_model, tiny_model
from efmuon.common.algorithm import WorkerState
from efmuon.common.model import model_specs, parameters_of
from efmuon.common.wire import chunking, protocol
from efmuon.server.coordinator import Coordinator
from efmuon.server.options import ServerOptions
from efmuon.server.plan import Plan
from efmuon.v1 import service_pb2 as pb
from efmuon.worker import Worker, WorkerError


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", [dict(), dict(init="zero"), dict(method="ef14", uplink="topk:0.3+bf16"),
                                     dict(preset="gluon", downlink="rankk:2")], ids=["ef21", "init-zero", "ef14", "gluon"])
async def test_worker_api_matches_the_core_round_bit_for_bit(variant):
    # Prepare
    cfg = make_cfg(workers=2, rounds=4, **variant)
    async with Harness(cfg) as h:
        # Execute
        stats = await run_workers(h.worker(0), h.worker(1))
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)

    # Assert
    expected = reference_w(cfg)
    assert h.coordinator.report.summary["w_sha256"] == expected
    assert [s["w_sha256"] for s in stats] == [expected, expected]  # the workers hold the same bits
    assert h.coordinator.report.summary["rounds"] == 4


async def test_wrong_fingerprint_or_version_is_refused_and_running_workers_carry_on():
    # Prepare
    cfg = make_cfg(workers=2, rounds=3)
    async with Harness(cfg) as h:
        good0 = asyncio.ensure_future(asyncio.to_thread(h.worker(0).run))
        for _ in range(100):  # wait until worker 0 has joined and submitted round 0
            if 0 in (await h.stub.Status(pb.StatusRequest())).submitted:
                break
            await asyncio.sleep(0.05)

        # Execute: a worker whose hidden layer is wider, then one that speaks protocol version 2
        with pytest.raises(WorkerError) as wrong_model:
            await asyncio.to_thread(h.worker(1, model=tiny_model(hidden=9)).run)
        with pytest.raises(grpc.aio.AioRpcError) as wrong_version:
            await h.raw_join(1, version=2)
        status = await h.stub.Status(pb.StatusRequest())
        good1 = await asyncio.to_thread(h.worker(1).run)
        good0 = await good0
        # the workers have their last reply; the server writes its summary just after (a hang guard)
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)

    # Assert
    assert wrong_model.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "parameter '0.weight' has shape (9, 6) here but (8, 6) on the server" in str(wrong_model.value)
    assert wrong_version.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "protocol version 2 is not supported" in wrong_version.value.details()
    assert list(status.joined) == [0] and list(status.submitted) == [0]  # the refusals left no trace
    assert good0["rounds"] == good1["rounds"] == 3
    assert h.coordinator.report.summary["w_sha256"] == reference_w(cfg)


async def test_bad_ids_sessions_and_rounds_get_clear_codes():
    cfg = make_cfg(workers=1, rounds=2, uplink="identity", downlink="identity")
    async with Harness(cfg) as h:
        # Execute / Assert: a client id outside 0..n-1
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await h.raw_join(7)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "0..0" in e.value.details()

        # an Exchange without Join
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await h.raw_exchange(0, "nope", 0, [])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Join first" in e.value.details()

        header = await h.raw_join(0)
        with pytest.raises(grpc.aio.AioRpcError) as e:  # the id is taken
            await h.raw_join(0)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS

        with pytest.raises(grpc.aio.AioRpcError) as e:  # a wrong session token
            await h.raw_exchange(0, "not-the-token", 0, [])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "session token" in e.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as e:  # a round from the future
            await h.raw_exchange(0, header.session, 5, [])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "collecting round 0" in e.value.details()


async def test_bad_frame_is_invalid_argument_and_changes_nothing_then_duplicates_are_not_applied_twice():
    cfg = make_cfg(workers=1, rounds=2, uplink="identity", downlink="identity")
    model = tiny_model()
    names, params = parameters_of(model)
    async with Harness(cfg) as h:
        header = await h.raw_join(0)
        ws = WorkerState(params, model_specs(model, cfg), cfg, 0)
        good = ws.init_uplink([torch.ones_like(p) for p in params])
        bad = [b"EF" + b"\xff" * (len(f) - 2) for f in good]

        # Execute: a garbled submission
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await h.raw_exchange(0, header.session, 0, bad)
        G_after_bad = [g.clone() for g in h.coordinator.state.G]
        status = await h.stub.Status(pb.StatusRequest())

        # then the valid one, and the same again (a client that lost the reply)
        first, s1 = await h.raw_exchange(0, header.session, 0, good)
        G_after_good = [g.clone() for g in h.coordinator.state.G]
        again, s1_again = await h.raw_exchange(0, header.session, 0, good)

    # Assert
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nothing was applied" in e.value.details()
    assert all(torch.count_nonzero(g) == 0 for g in G_after_bad) and list(status.submitted) == []
    assert first.round == 1 and not first.duplicate and len(s1) == sum(first.frame_lengths) > 0
    assert again.duplicate and again.round == 1 and s1_again == s1  # the same downlink bytes again
    assert all(torch.equal(a, b) for a, b in zip(G_after_good, h.coordinator.state.G))  # not applied twice
    assert all(torch.equal(a, torch.ones_like(a)) for a in G_after_good)


async def test_status_answers_while_a_round_is_computed():
    # Prepare: the evaluation (on the server's compute thread) holds that thread until the test has
    # had a Status reply saying "evaluating". So Status must be answered while a round is computed:
    # if it waited for the computation, the evaluation would wait in vain (and report it).
    seen_evaluating = threading.Event()
    waited = []

    def blocking_eval(W, X):
        waited.append(seen_evaluating.wait(60))
        return {"loss_w": 1.0, "loss_x": 2.0}

    cfg = make_cfg(workers=1, rounds=2)
    async with Harness(cfg, evaluate=blocking_eval) as h:
        run = asyncio.ensure_future(asyncio.to_thread(h.worker(0).run))
        phases = set()
        # Execute: poll Status while the run goes on
        while not run.done():
            st = await h.stub.Status(pb.StatusRequest(), timeout=30)
            phases.add((st.phase, st.state))
            if st.phase == "evaluating":
                seen_evaluating.set()
            await asyncio.sleep(0.02)
        await run

    # Assert
    assert ("evaluating", pb.StatusReply.STATE_RUNNING) in phases
    assert waited and all(waited), waited  # every evaluation was released by a Status reply given during it
    assert h.coordinator.report.summary["final_loss_w"] == 1.0


async def test_the_downlink_is_encoded_once_per_round_for_all_workers():
    # Prepare: count the server's steps (each encodes one downlink)
    cfg = make_cfg(workers=3, rounds=4)
    async with Harness(cfg) as h:
        steps = []
        step = h.coordinator.state.step
        h.coordinator.state.step = lambda: steps.append(1) or step()

        # Execute
        await run_workers(h.worker(0), h.worker(1), h.worker(2))
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)

    # Assert: one step per round for three workers, and every worker got the same S bytes
    assert len(steps) == cfg.rounds
    for r in h.coordinator.report.rounds:
        assert len({c["down"]["payload"] for c in r["clients"].values()}) == 1
        assert len({c["down"]["message"] for c in r["clients"].values()}) == 1


async def test_a_worker_failing_mid_run_aborts_the_run_for_everyone_at_the_deadline_with_a_clear_error():
    # Prepare: worker 1's data source breaks in round 2; nobody restarts it within the 1 s round deadline
    def broken(k):
        if k == 2:
            raise RuntimeError("disk on fire")
        return batches_of(1)(k)

    cfg = make_cfg(workers=2, rounds=4)
    async with Harness(cfg, options=ServerOptions(round_deadline=1.0)) as h:
        failing = Worker(tiny_model(), loss_fn, broken, server=h.address, client_id=1, configure_threads=False)

        # Execute
        results = await asyncio.gather(asyncio.to_thread(h.worker(0).run), asyncio.to_thread(failing.run),
                                       return_exceptions=True)
        status = await h.stub.Status(pb.StatusRequest())

    # Assert
    assert isinstance(results[1], RuntimeError)
    assert isinstance(results[0], WorkerError) and results[0].code == grpc.StatusCode.ABORTED
    assert "round 2: client(s) 1 did not submit within the round deadline of 1 s" in str(results[0])
    assert "client 1 left before the last round (RuntimeError: disk on fire)" in str(results[0])
    assert h.coordinator.finished.is_set() and status.state == pb.StatusReply.STATE_STOPPING


def test_chunk_message_size_arithmetic_equals_bytesize():
    # Arrange: chunk sizes around the varint boundaries (1, 2, 3 and 4 length bytes) and the 1 MiB chunk
    sizes = [0, 1, 127, 128, 16383, 16384, 65536, (1 << 20) - 1, 1 << 20, 2_097_152]
    for cls in (pb.JoinReply, pb.Submission, pb.Downlink):
        for n in sizes:
            msg = cls(chunk=b"\x5a" * n)
            # Act / Assert: sent (constructed) and received (parsed) messages
            assert chunking.chunk_message_size(cls, n) == msg.ByteSize(), (cls, n)
            parsed = cls.FromString(msg.SerializeToString())
            assert chunking.received_chunk_size(parsed, len(parsed.chunk)) == parsed.ByteSize(), (cls, n)
    # a peer's unknown field (field 19, varint 5) is counted exactly as ByteSize counts it
    data = pb.Submission(chunk=b"x" * 1000).SerializeToString() + b"\x98\x01\x05"
    odd = pb.Submission.FromString(data)
    assert chunking.received_chunk_size(odd, len(odd.chunk)) == odd.ByteSize() == len(data)
    # a Plan's chunk_message_bytes is the sum of its messages' ByteSize
    plan = Plan.build(3, [b"a" * 1500000, b"b" * 7, b"c" * 700000])
    assert plan.chunk_message_bytes == sum(m.ByteSize() for m in plan.chunks)
    assert b"".join(m.chunk for m in plan.chunks) == b"a" * 1500000 + b"b" * 7 + b"c" * 700000


def test_a_freed_last_reply_answers_a_stray_duplicate_with_resync_and_checkpoints_without_frames():
    cfg = make_cfg(workers=2, rounds=3)
    c = Coordinator(cfg, server_model(cfg), quiet=True)
    c.collecting, c.last_applied = 1, {0: 0, 1: 0}
    c.last_plan = Plan.build(1, [b"x" * 10, b"y" * 5])
    s0, s1 = c.join(0, protocol.PROTOCOL_VERSION, c.fingerprint, ""), c.join(1, protocol.PROTOCOL_VERSION, c.fingerprint, "")
    # Act: client 0 starts round 1 (client 1 has not): the reply is kept; then client 1 starts it too
    c.release_last_reply(s0, 1)
    kept = c.reply_for("last", 0)
    kept_chunks = len(kept.chunks)
    c.submitted.add(0)
    c.release_last_reply(s1, 1)
    # Assert
    assert kept is c.last_plan and kept_chunks == 1
    assert c.last_plan.released and c.last_plan.chunks == [] and c.reply_for("last", 0) is None
    meta, _, tensors = c._checkpoint_payload()
    assert meta["plan"] == {"round": 1, "done": False, "frame_lengths": [], "released": True} and "plan" not in tensors

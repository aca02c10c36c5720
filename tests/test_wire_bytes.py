"""The `wire` byte level is the server's own count (server/wirecount.py): what each client's TCP
connection carried, read from the server-side socket's TCP_INFO through sock_diag, per call. Real
servers, real sockets, 127.0.0.1. The workers' own counts (the relay's WireReports) are a cross-check
(`wire_client`): an implausible one is refused, in Exchange and in Leave, and leaves no trace."""
from __future__ import annotations

import argparse
import asyncio
import json
import socket

import grpc
import pytest
import torch
from conftest import Harness, make_cfg, run_workers, tiny_model
from efmuon.cli.worker import _measure_wire, add_worker_flags
from efmuon.common.algorithm import WorkerState
from efmuon.common.config import RunConfig, resolve
from efmuon.common.model import model_specs, parameters_of
from efmuon.common.wire import chunking
from efmuon.server import service, wirecount
from efmuon.server.coordinator import Coordinator, ServerModel
from efmuon.v1 import service_pb2 as pb
from efmuon.worker import Worker
from efmuon.worker.connection import Connection
from torch import nn

PARAMS = 1 << 20  # 4 MiB of float32 per identity transfer: big enough for framing to be a small share
LAYERS = 2


class Mid(nn.Module):
    """Two 1-D parameters (bias-RMS LMO: the server's step is a few passes over memory)."""

    def __init__(self):
        super().__init__()
        self.p = nn.ParameterList([nn.Parameter(torch.full((PARAMS // LAYERS,), 0.5 + i)) for i in range(LAYERS)])


def mid_loss(model: Mid, batch) -> torch.Tensor:
    return sum(0.5 * (p - batch).square().sum() for p in model.p)


def figures(report: dict) -> list[tuple[str, str, dict]]:
    """(where, client, {up: {...}, down: {...}}) for the join phase and every round, per client."""
    out = [("init", j, c) for j, c in report["summary"]["init_clients"].items()]
    for r in report["rounds"]:
        out += [(f"round {r['round']}", j, c) for j, c in r["clients"].items()]
    return out


async def _raw_exchange(h: Harness, j: int, session: str, round_: int, frames: list[bytes], previous=None):
    header = pb.SubmissionHeader(client_id=j, session=session, round=round_, frame_lengths=[len(f) for f in frames])
    if previous is not None:
        header.previous.CopyFrom(previous)

    def requests():
        yield pb.Submission(header=header)
        for c in chunking.iter_chunks(frames):
            yield pb.Submission(chunk=c)
    replies = [m async for m in h.stub.Exchange(requests())]
    return replies[0].header


def _uplinks(cfg: RunConfig) -> tuple[list[bytes], list[bytes]]:
    """A raw client's frames of round 0 and round 1 (zero gradients: any valid frames will do)."""
    model = tiny_model()
    _, params = parameters_of(model)
    ws = WorkerState(params, model_specs(model, cfg), cfg, 0)
    zeros = [torch.zeros_like(p) for p in params]
    return ws.init_uplink(zeros), ws.make_uplink(zeros)


# ---------------------------------------------------------------------------------------------- tests
async def test_the_servers_count_covers_every_message_and_is_close_to_it_for_big_transfers():
    # Prepare: worker 0 connects directly (the default), worker 1 through its counting relay
    cfg = resolve(RunConfig(task="lsq", workers=2, rounds=2, lr=0.01, beta=1.0, schedule="constant", warmup=0,
                            preset="muon", uplink="identity", downlink="identity"), {})
    model = Mid()
    names, params = parameters_of(model)
    coordinator = Coordinator(cfg, ServerModel(names, params, model_specs(model, cfg)), quiet=True, leave_timeout=10)
    server, port = await service.start(coordinator)
    workers = [Worker(Mid(), mid_loss, lambda k: 0.25 * k, server=f"127.0.0.1:{port}", client_id=j,
                      configure_threads=False, measure_wire=(j == 1)) for j in range(2)]
    try:
        # Execute
        await run_workers(*workers)
        await asyncio.wait_for(coordinator.finished.wait(), 30)
    finally:
        await server.stop(0)
        coordinator.executor.shutdown(wait=True)
    report = coordinator.report.to_dict()
    summary = report["summary"]

    # Assert: the server counted every call of both clients itself
    assert summary["wire_source"] == "server"
    assert workers[0].conn.relay is None and workers[1].conn.relay is not None
    assert summary["resilience"]["wire_unmeasured_calls"] == 0
    for where, j, c in figures(report):
        for d in ("up", "down"):
            b = c[d]
            assert b["wire"] >= b["message"] >= b["payload"] > 0, (where, j, d, b)
            if b["payload"] >= PARAMS * 4:  # 4 MiB: framing (HTTP/2, gRPC, protobuf) is a small share
                assert b["wire"] <= 1.01 * b["message"] + 16384, (where, j, d, b)
    # the relay's counts agree with the server's (within 5% + 4 KiB per call), and only client 1 sends them
    assert summary["resilience"]["wire_mismatches"] == 0
    assert all(("wire_client" in c["up"]) == (j == "1") for _, j, c in figures(report))
    # the totals are the sum of the per-client figures
    for d in ("up", "down"):
        assert summary["bytes"][d]["wire"] == sum(c[d]["wire"] for _, _, c in figures(report))


async def test_the_relays_reports_are_kept_exactly_as_wire_client():
    cfg = make_cfg(workers=2, rounds=3)
    async with Harness(cfg) as h:
        workers = [h.worker(0, measure_wire=True), h.worker(1, measure_wire=True)]
        # Execute
        await run_workers(*workers)
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
    report = h.coordinator.report.to_dict()

    # Assert: per client, wire_client is exactly what that client's relay counted, call by call, and it
    # adds up to everything its TCP connection carried before Leave; wire is the server's count
    for w in workers:
        j = str(w.client_id)
        init = report["summary"]["init_clients"][j]
        per_round = [r["clients"][j] for r in report["rounds"]]
        calls = [c["wire"] for c in w.history]  # join, exchange 0, 1, 2, 3
        assert init["down"]["wire_client"] == calls[0]["down"]
        assert init["up"]["wire_client"] == calls[0]["up"] + calls[1]["up"]
        assert [r["up"]["wire_client"] for r in per_round] == [c["up"] for c in calls[2:]]
        assert [r["down"]["wire_client"] for r in per_round[:-1]] == [c["down"] for c in calls[1:-2]]
        assert per_round[-1]["down"]["wire_client"] == calls[-2]["down"] + calls[-1]["down"]
        total = w.conn._mark  # the relay's counters at the last measurement
        assert init["up"]["wire_client"] + sum(r["up"]["wire_client"] for r in per_round) == total["up"]
        assert init["down"]["wire_client"] + sum(r["down"]["wire_client"] for r in per_round) == total["down"]
        for fig in [init, *per_round]:
            for d in ("up", "down"):
                # HTTP/2 frame headers (9 B) and gRPC prefixes (5 B) at least: wire is never the message size
                assert fig[d]["wire"] > fig[d]["message"] >= fig[d]["payload"], fig
    assert report["summary"]["resilience"]["wire_mismatches"] == 0


async def test_absurd_wire_reports_are_refused_in_exchange_and_leave_and_leave_no_trace():
    # Prepare: a raw client (one connection) that has joined
    cfg = make_cfg(workers=1, rounds=1, uplink="identity", downlink="identity")
    init, up1 = _uplinks(cfg)
    absurd = pb.WireReport(exchange=-1, up=10 ** 12, down=10 ** 12)
    async with Harness(cfg) as h:
        session = (await h.raw_join(0)).session
        before = h.coordinator.state_sha256()

        # Execute: round 0 with a report of 10^12 bytes for a call of ~1 KB
        with pytest.raises(grpc.aio.AioRpcError) as exchange_refused:
            await _raw_exchange(h, 0, session, 0, init, previous=absurd)
        status = await h.stub.Status(pb.StatusRequest())
        after = h.coordinator.state_sha256()
        # the same submission without a report goes through, then round 1, then Leave with 10^12 bytes
        first = await _raw_exchange(h, 0, session, 0, init)
        done = await _raw_exchange(h, 0, session, 1, up1)
        with pytest.raises(grpc.aio.AioRpcError) as leave_refused:
            await h.stub.Leave(pb.LeaveRequest(client_id=0, session=session,
                                               last=pb.WireReport(exchange=1, up=1, down=10 ** 12)))
        await h.stub.Leave(pb.LeaveRequest(client_id=0, session=session))
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
    report = h.coordinator.report.to_dict()

    # Assert: both refused with INVALID_ARGUMENT, nothing changed, and no trace of the figures in the report
    for refused in (exchange_refused, leave_refused):
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "implausible" in refused.value.details() and "could have carried" in refused.value.details()
    assert after == before and list(status.submitted) == []
    assert first.round == 1 and done.done
    assert str(10 ** 12) not in json.dumps(report)
    assert all("wire_client" not in c[d] for _, _, c in figures(report) for d in ("up", "down"))
    assert report["summary"]["resilience"]["rejected_requests"] == 2


async def test_a_report_far_from_the_servers_count_is_kept_as_wire_client_and_counted_as_a_mismatch(caplog):
    # Prepare: a raw client whose report of its join phase says 200 kB up (it sent ~1 kB)
    cfg = make_cfg(workers=1, rounds=1, uplink="identity", downlink="identity")
    init, up1 = _uplinks(cfg)
    async with Harness(cfg) as h:
        session = (await h.raw_join(0)).session
        # Execute
        await _raw_exchange(h, 0, session, 0, init, previous=pb.WireReport(exchange=-1, up=200_000, down=0))
        await _raw_exchange(h, 0, session, 1, up1)
        await h.stub.Leave(pb.LeaveRequest(client_id=0, session=session))
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
    report = h.coordinator.report.to_dict()

    # Assert: accepted (plausible), kept apart from the server's figure, counted and logged
    joined = report["summary"]["init_clients"]["0"]
    assert joined["up"]["wire_client"] == 200_000 and joined["down"]["wire_client"] == 0
    assert joined["up"]["message"] < joined["up"]["wire"] < 20_000 and joined["down"]["wire"] > 0
    assert report["summary"]["resilience"]["wire_mismatches"] == 1
    assert "disagrees with the server's count" in caplog.text and "up 200000 B reported" in caplog.text


async def test_a_client_that_sends_no_wire_report_still_gets_the_servers_figures():
    # Prepare: a raw client: Join, round 0, round 1, Leave, never a WireReport
    cfg = make_cfg(workers=1, rounds=1, uplink="identity", downlink="identity")
    init, up1 = _uplinks(cfg)
    async with Harness(cfg) as h:
        session = (await h.raw_join(0)).session
        # Execute
        await _raw_exchange(h, 0, session, 0, init)
        await _raw_exchange(h, 0, session, 1, up1)
        await h.stub.Leave(pb.LeaveRequest(client_id=0, session=session))
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
    report = h.coordinator.report.to_dict()

    # Assert: every round has the server's wire figures, per client and in total, and no client figure
    assert report["summary"]["wire_source"] == "server"
    for where, j, c in figures(report):
        for d in ("up", "down"):
            assert c[d]["wire"] > c[d]["message"] >= c[d]["payload"] > 0, (where, d, c)
            assert "wire_client" not in c[d]
    for r in report["rounds"]:
        assert r["bytes"]["up"]["wire"] > r["bytes"]["up"]["message"] > 0


async def test_without_sock_diag_the_clients_reports_are_the_wire_figures(monkeypatch):
    # Prepare: a kernel without sock_diag (or one that refuses it)
    def refuse(self):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(wirecount.TcpInfo, "open", refuse)
    cfg = make_cfg(workers=2, rounds=2)
    async with Harness(cfg) as h:
        relayed, direct = h.worker(0, measure_wire=True), h.worker(1)
        # Execute
        await run_workers(relayed, direct)
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
    report = h.coordinator.report.to_dict()

    # Assert: the report says whose figures these are; a worker that counts nothing has none (never estimated)
    assert report["summary"]["wire_source"] == "client"
    for where, j, c in figures(report):
        for d in ("up", "down"):
            if j == "0":
                assert c[d]["wire"] == c[d]["wire_client"] > c[d]["message"], (where, d, c)
            else:
                assert c[d]["wire"] is None and "wire_client" not in c[d] and c[d]["message"] > 0
    assert report["summary"]["resilience"]["wire_mismatches"] == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_the_server_counts_ipv6_connections_too():
    cfg = make_cfg(workers=1, rounds=2)
    h = Harness(cfg)
    server, port = await service.start(h.coordinator, host="[::1]")
    try:
        worker = Worker(tiny_model(), lambda m, b: m(b).square().mean(), lambda k: torch.ones(4, 6),
                        server=f"[::1]:{port}", client_id=0, configure_threads=False)
        await asyncio.to_thread(worker.run)
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
    finally:
        await server.stop(0)
        h.coordinator.executor.shutdown(wait=True)
    report = h.coordinator.report.to_dict()
    assert report["summary"]["wire_source"] == "server"
    assert all(c[d]["wire"] > c[d]["message"] for _, _, c in figures(report) for d in ("up", "down"))


def test_peers_as_grpc_writes_them():
    assert wirecount.parse_peer("ipv4:127.0.0.1:50051") == (socket.AF_INET, bytes([127, 0, 0, 1]), 50051)
    v6 = (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::1"), 4242)
    assert wirecount.parse_peer("ipv6:[::1]:4242") == v6 and wirecount.parse_peer("ipv6:%5B::1%5D:4242") == v6
    for odd in ("unix:/tmp/s", "ipv4:1.2.3:80", "ipv4:127.0.0.1", "", "ipv6:[zz]:1"):
        assert wirecount.parse_peer(odd) is None


def test_the_worker_connects_directly_unless_it_shapes_or_counts():
    parser = argparse.ArgumentParser()
    add_worker_flags(parser)
    base = ["--server", "127.0.0.1:1"]
    assert [_measure_wire(parser.parse_args(base + x)) for x in ([], ["--client-wire"], ["--no-wire"])] == \
        [None, True, False]
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--client-wire", "--no-wire"])
    direct, counting = Connection("127.0.0.1:1"), Connection("127.0.0.1:1", measure_wire=True)
    shaped, quiet = Connection("127.0.0.1:1", link="up=1gbit"), Connection("127.0.0.1:1", False, link="up=1gbit")
    try:
        assert direct.relay is None and direct.since_mark(0) is None
        assert counting.relay is not None and counting.since_mark(0) == pb.WireReport(exchange=0, up=0, down=0)
        assert shaped.relay is not None and shaped.since_mark(0) is not None
        assert quiet.relay is not None and quiet.since_mark(0) is None and len(quiet.transfers) == 1
    finally:
        for c in (direct, counting, shaped, quiet):
            c.close()

"""Nothing lost: a server killed with SIGKILL resumes from its checkpoint and the workers reconnect by
themselves (bit-identical result); a worker killed mid-round re-joins and is re-synced (or resumes
from its own checkpoint, bit-identical); a stalled worker meets the round deadline. Real server and
worker processes on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest
import torch
from conftest import Harness, batches_of, efmuon_cli, finish, free_port, loss_fn, make_cfg, reference_w, run_workers, server_model, start, tiny_model, wait_round
from efmuon.common.algorithm import params_sha256
from efmuon.common.checkpoint import list_checkpoints, load_server
from efmuon.common.compress import parse_spec
from efmuon.common.model import parameters_of
from efmuon.server import service
from efmuon.server.coordinator import Coordinator
from efmuon.server.options import ServerOptions
from efmuon.v1 import service_pb2 as pb
from efmuon.worker import Worker, WorkerError

FLAGS = ["--task", "lsq", "--workers", "2", "--rounds", "30", "--uplink", "topk:0.2", "--downlink", "natural"]


def server(port: int, tmp, *extra: str) -> subprocess.Popen:
    return start(["server", "--host", "127.0.0.1", "--port", str(port), *FLAGS, "--report", str(tmp / "net.json"),
                  *extra], tmp / "server.log")


def worker(port: int, j: int, tmp, *extra: str) -> subprocess.Popen:
    return start(["worker", "--server", f"127.0.0.1:{port}", "--client-id", str(j), *extra], tmp / f"worker{j}.log")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """w_sha256 of the uninterrupted run (simulate == run bit for bit, see test_service_e2e)."""
    tmp = tmp_path_factory.mktemp("ref")
    out = efmuon_cli("simulate", *FLAGS, "--report", str(tmp / "sim.json"), "--plots", "none")
    assert out.returncode == 0, out.stderr
    return json.loads((tmp / "sim.json").read_text())["summary"]["w_sha256"]


@pytest.mark.slow
def test_server_killed_at_round_7_resumes_and_the_workers_reconnect_bit_identically(tmp_path, reference):
    # Prepare
    port = free_port()
    ckpt = tmp_path / "ckpt"
    first = server(port, tmp_path, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1")
    workers = [worker(port, j, tmp_path) for j in range(2)]
    try:
        killed_at = wait_round(port, 7, first, tmp_path / "server.log")

        # Execute: SIGKILL the server mid-run, restart it on the same port from its checkpoint
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        second = server(port, tmp_path, "--resume", str(ckpt))
        codes = finish([second, *workers], tmp_path)
    finally:
        for p in [first, *workers]:
            if p.poll() is None:
                p.kill()

    # Assert
    assert codes == [0, 0, 0]
    assert 7 <= killed_at < 30
    report = json.loads((tmp_path / "net.json").read_text())
    assert report["summary"]["w_sha256"] == reference
    assert report["summary"]["rounds"] == 30 and [r["round"] for r in report["rounds"]] == list(range(1, 31))
    assert report["summary"]["resilience"]["resumed_from"].startswith(str(ckpt))
    assert "resumed from" in (tmp_path / "server.log").read_text()
    for j in range(2):
        assert "reconnecting" in (tmp_path / f"worker{j}.log").read_text()
        assert reference in (tmp_path / f"worker{j}.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("worker_checkpoint", [False, True], ids=["resync", "worker-checkpoint"])
def test_worker_killed_mid_round_rejoins_and_the_run_finishes(tmp_path, reference, worker_checkpoint):
    # Prepare
    port = free_port()
    srv = server(port, tmp_path, "--round-deadline", "60")
    extra = lambda j: ["--checkpoint-dir", str(tmp_path / f"w{j}")] if worker_checkpoint else []  # noqa: E731
    w0, w1 = worker(port, 0, tmp_path, *extra(0)), worker(port, 1, tmp_path, *extra(1))
    try:
        wait_round(port, 5, srv, tmp_path / "server.log")

        # Execute: SIGKILL worker 1 mid-run; the others wait for it; start it again with the same id
        w1.send_signal(signal.SIGKILL)
        w1.wait(timeout=10)
        time.sleep(0.3)
        w1b = worker(port, 1, tmp_path, *extra(1))
        codes = finish([srv, w0, w1b], tmp_path)
    finally:
        for p in (srv, w0, w1):
            if p.poll() is None:
                p.kill()

    # Assert
    assert codes == [0, 0, 0]
    report = json.loads((tmp_path / "net.json").read_text())
    assert report["summary"]["rounds"] == 30
    log1 = (tmp_path / "worker1.log").read_text()
    if worker_checkpoint:  # exact: W, M_j, G_j and the submission in flight came back from disk
        assert "resumed from its checkpoint" in log1 or "continues from its own state" in log1
        assert report["summary"]["w_sha256"] == reference
    else:  # re-synced: W and G_j from the server, M_j := G_j; the run goes on (not bit-identical)
        assert "re-synced from the server" in log1
        assert "re-joined" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("policy", ["fail", "proceed"])
async def test_a_stalled_worker_meets_the_round_deadline(policy):
    """In-process: worker 1 stalls in round 3 until that round has closed without it (the run aborted, or
    went on with worker 0 alone); the round fails loudly or proceeds without it. The stall ends on that
    event, not after a time, so the test does not race the deadline."""
    cfg = make_cfg(workers=2, rounds=4)
    deadline = 3.0  # the other submissions of the run take milliseconds, also on a loaded machine
    released = threading.Event()

    def stalls(k):
        if k == 3:
            assert released.wait(60), "round 3 never closed without worker 1"
        return batches_of(1)(k)

    async with Harness(cfg, options=ServerOptions(round_deadline=deadline, on_deadline=policy)) as h:
        slow = Worker(tiny_model(), loss_fn, stalls, server=h.address, client_id=1, configure_threads=False)
        runs = [asyncio.ensure_future(asyncio.to_thread(h.worker(0).run)),
                asyncio.ensure_future(asyncio.to_thread(slow.run))]
        # Execute: release worker 1 once round 3's deadline has passed (a partial round, or the abort)
        while not released.is_set():
            st = await h.stub.Status(pb.StatusRequest(), timeout=30)
            if st.partial_rounds or h.coordinator.finished.is_set() or any(r.done() for r in runs):
                released.set()
            else:
                await asyncio.sleep(0.01)
        results = await asyncio.gather(*runs, return_exceptions=True)
        # the summary is written after the last reply went out: wait for it (a loaded machine is slow there)
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
        status = await h.stub.Status(pb.StatusRequest())

    if policy == "fail":
        assert isinstance(results[0], WorkerError) and results[0].code == grpc.StatusCode.ABORTED
        assert "round 3: client(s) 1 did not submit within the round deadline of 3 s" in str(results[0])
        assert "client 1 is connected but did not submit" in str(results[0])
    else:
        assert all(isinstance(r, dict) for r in results), results
        report = h.coordinator.report.to_dict()
        assert report["summary"]["rounds"] == 4
        assert report["rounds"][2]["skipped_clients"] == [1]
        assert status.partial_rounds == 1 and slow.resyncs == 1  # the late worker was re-synced ...
        assert "skipped_clients" not in report["rounds"][3]  # ... and took part in round 4 again
        # G is still the mean of all estimators
        st = h.coordinator.state
        for i, g in enumerate(st.G):
            mean = sum(st.estimators[j][i] for j in range(2)) / 2
            assert (g - mean).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["bf16", "disk"])
async def test_estimator_storage_modes_keep_the_run_exact_and_bound_memory(tmp_path, mode):
    """The server's copies of G_j only serve re-sync: bf16 halves them, disk spills them to files."""

    cfg = make_cfg(workers=2, rounds=3)
    opts = ServerOptions(estimators=mode, checkpoint_dir=str(tmp_path / "ckpt"))
    async with Harness(cfg, options=opts) as h:
        await run_workers(h.worker(0), h.worker(1))
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
    est = h.coordinator.state.estimators
    assert h.coordinator.report.summary["w_sha256"] == reference_w(cfg)  # G is exact whatever the storage
    assert sorted(est) == [0, 1]
    if mode == "bf16":
        assert all(t.dtype == torch.bfloat16 for t in est[0])
        assert est.nbytes() == sum(p.numel() for p in h.coordinator.state.X) * 2 * 2
    else:
        assert len(list((tmp_path / "ckpt" / "estimators").glob("client-*-layer-*.f32"))) == 2 * len(est[0])
    assert (tmp_path / "ckpt" / "LATEST").is_file()  # the final checkpoint (estimators saved as float32)

    tensors, m = load_server(tmp_path / "ckpt")
    assert m["extra"]["collecting"] == 4 and tensors["G_j/1/0"].dtype == torch.float32


async def test_nan_policy_zero_replaces_and_counts_non_finite_values():


    cfg = make_cfg(workers=1, rounds=2, uplink="identity", downlink="identity")
    model = tiny_model()
    names, params = parameters_of(model)
    async with Harness(cfg, options=ServerOptions(nan_policy="zero")) as h:
        header = await h.raw_join(0)
        grads = [torch.ones_like(p) for p in params]
        grads[0][0, 0], grads[0][0, 1] = math.nan, math.inf
        # A peer that sends non-finite values (our own WorkerState refuses to encode them).
        identity = parse_spec("identity")
        frames = [identity.encode(g, 0) for g in grads]
        reply, _ = await h.raw_exchange(0, header.session, 0, frames)
        status = await h.stub.Status(pb.StatusRequest())
        G0 = h.coordinator.state.G[0].clone()
    assert reply.round == 1 and not reply.duplicate
    assert status.nonfinite_zeroed == 2
    assert G0[0, 0] == 0 and G0[0, 1] == 0 and G0[0, 2] == 1 and torch.isfinite(G0).all()


@pytest.mark.parametrize("bad, message", [(float("nan"), "non-finite value"), (float("-inf"), "non-finite value"),
                                          (-3e38, "is above")])
async def test_reject_policy_refuses_non_finite_and_huge_values_and_keeps_state(bad, message):

    cfg = make_cfg(workers=1, rounds=2, uplink="identity", downlink="identity")
    names, params = parameters_of(tiny_model())
    async with Harness(cfg, options=ServerOptions(nan_policy="reject")) as h:
        header = await h.raw_join(0)
        before = [g.clone() for g in h.coordinator.state.G]
        grads = [torch.ones_like(p) for p in params]
        grads[-1].view(-1)[-1] = bad  # the last entry of the last layer: a one-pass check must still see it
        identity = parse_spec("identity")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.raw_exchange(0, header.session, 0, [identity.encode(g, 0) for g in grads])
        after = h.coordinator.state.G
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert all(torch.equal(a, b) for a, b in zip(after, before))


class CuttableProxy:
    """A TCP relay to 127.0.0.1:`port` whose open connections the test cuts at a moment of its choosing
    (both sockets shut down and closed: the peers see the connection end mid-call); new connections
    are relayed as before, so a client that reconnects reaches the server again."""

    def __init__(self, port: int):

        self.target = port
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:

        while True:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.open += [client, upstream]
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            socks, self.open = self.open, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.lsock.close()
        self.cut()


class ReplyHeaderGate:
    """Patches the in-process server's Exchange and Join (pytest monkeypatch) to record what client
    `client` submits, is answered and announces, and to hold back the chunks of the reply to its
    round `round_` after that reply's header went out, until `resume` is set."""

    def __init__(self, monkeypatch, client: int, round_: int):

        self.submissions: list[tuple[int, int]] = []  # (round, number of frames) per Exchange of `client`
        self.replies: list[tuple[int, int, bool, bool]] = []  # (submitted round, header round, duplicate, resync)
        self.joins: list[int | None] = []  # resume_round of each Join of `client`
        self.header_sent, self.resume = asyncio.Event(), asyncio.Event()
        exchange, join, gate = service.ParameterServer.Exchange, service.ParameterServer.Join, self

        async def gated_exchange(servicer, request_iterator, context):
            seen = {}

            async def requests():
                async for m in request_iterator:
                    if not seen and m.WhichOneof("part") == "header":
                        seen.update(client=m.header.client_id, round=m.header.round)
                        if seen["client"] == client:
                            gate.submissions.append((m.header.round, len(m.header.frame_lengths)))
                    yield m
            async for msg in exchange(servicer, requests(), context):
                yield msg
                if msg.WhichOneof("part") == "header" and seen.get("client") == client:
                    h = msg.header
                    gate.replies.append((seen["round"], h.round, h.duplicate, h.resync))
                    if seen["round"] == round_ and not gate.header_sent.is_set():
                        gate.header_sent.set()
                        await gate.resume.wait()

        async def recorded_join(servicer, request, context):
            if request.client_id == client:
                gate.joins.append(request.resume_round if request.HasField("resume_round") else None)
            async for msg in join(servicer, request, context):
                yield msg

        monkeypatch.setattr(service.ParameterServer, "Exchange", gated_exchange)
        monkeypatch.setattr(service.ParameterServer, "Join", recorded_join)

    async def acknowledged(self, worker, round_: int) -> None:
        """Wait until `worker` took the held reply's header: it freed its frames of `round_`."""
        await asyncio.wait_for(self.header_sent.wait(), 30)
        deadline = time.monotonic() + 10
        while not (worker._acknowledged and worker.pending is not None and worker.pending[0] == round_):
            assert time.monotonic() < deadline, "the worker did not take the reply header"
            await asyncio.sleep(0.002)
        assert worker.pending[1] == []  # its frames are gone: it cannot resend them


async def test_connection_lost_after_the_reply_header_resumes_at_the_next_round_bit_identically(monkeypatch):
    """In-process server, worker 1 behind a relay the test cuts. Worker 1 receives the header of the reply
    to its round-2 submission (it then frees its frames, `_acknowledged`), and the connection is cut
    before the downlink's chunks arrive. It re-joins announcing round 3 (`_resume_round`), the server
    keeps its state (no re-sync, so M_j survives), it resends round 2 without frames, gets the same
    reply again as a duplicate, and the run ends with the bits of an uninterrupted run."""

    cfg = make_cfg(workers=2, rounds=4)
    K = 2  # the round whose reply header arrives before the cut
    gate = ReplyHeaderGate(monkeypatch, client=1, round_=K)
    async with Harness(cfg) as h:
        proxy = CuttableProxy(h.port)
        w1 = Worker(tiny_model(), loss_fn, batches_of(1), server=f"127.0.0.1:{proxy.port}", client_id=1,
                    configure_threads=False, reconnect_timeout=30)

        async def cut_after_the_header():
            await gate.acknowledged(w1, K)
            proxy.cut()
            gate.resume.set()

        try:
            # Execute
            stats, _ = await asyncio.gather(run_workers(h.worker(0), w1), cut_after_the_header())
            await asyncio.wait_for(h.coordinator.finished.wait(), 60)
        finally:
            gate.resume.set()
            proxy.close()

    # Assert
    expected = reference_w(cfg)
    assert h.coordinator.report.summary["w_sha256"] == expected
    assert [s["w_sha256"] for s in stats] == [expected, expected]
    assert w1.reconnects == 1 and w1.resyncs == 0
    # At least the first connection and the one after the cut. gRPC may open one more TCP connection
    # on its own (the old channel's subchannel retries before it is closed), so the count is a floor;
    # the worker-level record (joins, submissions) is what says the resume happened once.
    assert proxy.connections >= 2
    assert gate.joins == [None, K + 1]  # the first Join, then the resume at round K + 1
    p = len(w1.state.W)
    assert gate.submissions == [(0, p), (1, p), (K, p), (K, 0), (3, p), (4, p)]  # round K again, without frames
    assert gate.replies[2:4] == [(K, K + 1, False, False), (K, K + 1, True, False)]  # the same reply, a duplicate


async def test_a_server_resumed_from_an_older_checkpoint_re_syncs_a_worker_that_freed_its_frames(monkeypatch, tmp_path):
    """Why `_resume_round` announces K + 1 once the reply header arrived: worker 1 freed its round-K
    frames, then the server is replaced by one resumed from the checkpoint taken before round K was
    applied (it is collecting K). Announcing K would make that server keep the worker's state and take
    the frameless resend of round K as its submission (R_j = 0 on the server, not on the worker: their
    G_j diverge); announcing K + 1 gets it re-synced. Both workers go through the relay, which is
    re-pointed at the resumed server before the cut; the run completes with every G_j and W agreeing."""

    cfg = make_cfg(workers=2, rounds=4)
    K = 2
    ckpt = tmp_path / "ckpt"
    gate = ReplyHeaderGate(monkeypatch, client=1, round_=K)
    async with Harness(cfg, options=ServerOptions(checkpoint_dir=str(ckpt), checkpoint_every=1,
                                                  checkpoint_keep=10)) as first:
        proxy = CuttableProxy(first.port)
        workers = [Worker(tiny_model(), loss_fn, batches_of(j), server=f"127.0.0.1:{proxy.port}", client_id=j,
                          configure_threads=False, reconnect_timeout=30) for j in range(2)]
        second = {}

        async def replace_the_server_after_the_header():
            await gate.acknowledged(workers[1], K)
            older = [c for _, c in list_checkpoints(ckpt) if load_server(c)[1]["extra"]["collecting"] == K]
            assert older, list_checkpoints(ckpt)
            coord = Coordinator(cfg, server_model(cfg), quiet=True, leave_timeout=5, resume=load_server(older[0]))
            second["coordinator"] = coord
            second["server"], proxy.target = await service.start(coord)
            proxy.cut()  # both workers lose the first server; they reconnect to the second
            gate.resume.set()

        try:
            # Execute
            stats, _ = await asyncio.gather(run_workers(*workers), replace_the_server_after_the_header())
            coord = second["coordinator"]
            await asyncio.wait_for(coord.finished.wait(), 60)
        finally:
            gate.resume.set()
            proxy.close()
            if "server" in second:
                await second["server"].stop(0)
                second["coordinator"].executor.shutdown(wait=True)

    # Assert
    st = coord.state
    names = workers[0].names
    assert gate.joins == [None, K + 1]  # the second server is collecting K: it re-syncs, not resumes ...
    assert workers[1].resyncs == 1 and workers[1].reconnects == 1
    p = len(st.W)
    assert gate.submissions[:3] == [(0, p), (1, p), (K, p)] and gate.submissions[3] == (K, p)  # ... K recomputed
    assert coord.report.summary["rounds"] == 4
    assert [s["w_sha256"] for s in stats] == [params_sha256(st.W, names)] * 2
    for j, w in enumerate(workers):  # the server's copy of each G_j is the worker's, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(st.estimators[j], w.state.Gj))
    for i, g in enumerate(st.G):
        torch.testing.assert_close(g, (st.estimators[0][i] + st.estimators[1][i]) / 2, rtol=1e-5, atol=1e-6)

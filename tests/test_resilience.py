"""Nothing lost: a server killed with SIGKILL resumes from its checkpoint and the workers reconnect by
themselves (bit-identical result); a worker killed mid-round re-joins and is re-synced (or resumes
from its own checkpoint, bit-identical); a stalled worker meets the round deadline. Real server and
worker processes on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest

from efmuon.server import protocol
from efmuon.v1 import service_pb2 as pb
from efmuon.v1 import service_pb2_grpc as pb_grpc

FLAGS = ["--task", "lsq", "--workers", "2", "--rounds", "30", "--uplink", "topk:0.2", "--downlink", "natural"]
CLI = [sys.executable, "-m", "efmuon.common.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log_path) -> subprocess.Popen:
    return subprocess.Popen(CLI + args, stdout=open(log_path, "a"), stderr=subprocess.STDOUT, text=True)


def server(port: int, tmp, *extra: str) -> subprocess.Popen:
    return start(["server", "--host", "127.0.0.1", "--port", str(port), *FLAGS, "--report", str(tmp / "net.json"),
                  *extra], tmp / "server.log")


def worker(port: int, j: int, tmp, *extra: str) -> subprocess.Popen:
    return start(["worker", "--server", f"127.0.0.1:{port}", "--client-id", str(j), *extra], tmp / f"worker{j}.log")


def wait_round(port: int, at_least: int, proc: subprocess.Popen, log, timeout: float = 60) -> int:
    """Poll Status until the server collects round >= at_least; returns that round."""
    deadline = time.monotonic() + timeout
    while "listening on" not in log.read_text():  # connect only once it listens: no reconnect backoff
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=protocol.CHANNEL_OPTIONS)
    stub = pb_grpc.ParameterServerStub(channel)
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                st = stub.Status(pb.StatusRequest(), timeout=1)
                if st.round >= at_least:
                    return st.round
            except grpc.RpcError:
                pass
            time.sleep(0.003)
    finally:
        channel.close()
    raise AssertionError(f"round {at_least} not reached: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """w_sha256 of the uninterrupted run (simulate == run bit for bit, see test_service_e2e)."""
    tmp = tmp_path_factory.mktemp("ref")
    out = subprocess.run(CLI + ["simulate", *FLAGS, "--report", str(tmp / "sim.json"), "--plots", "none"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads((tmp / "sim.json").read_text())["summary"]["w_sha256"]


def finish(procs: list[subprocess.Popen], tmp, timeout: float = 120) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(tmp.glob("*.log")))
        print(logs)


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
    """In-process: worker 1 stops submitting after round 2; the round fails loudly or proceeds without it."""
    from efmuon.server import service
    from efmuon.server.coordinator import Coordinator, ServerOptions
    from test_service_protocol import Harness, batches_of, loss_fn, make_cfg, tiny_model  # noqa: F401
    from efmuon.worker import Worker, WorkerError

    cfg = make_cfg(workers=2, rounds=4)

    def stalls(k):
        if k == 3:
            time.sleep(2.0)  # stalls past the 1.5 s deadline, then carries on
        return batches_of(1)(k)

    async with Harness(cfg, options=ServerOptions(round_deadline=1.5, on_deadline=policy)) as h:
        slow = Worker(tiny_model(), loss_fn, stalls, server=h.address, client_id=1, configure_threads=False)
        t0 = time.monotonic()
        results = await asyncio.gather(asyncio.to_thread(h.worker(0).run), asyncio.to_thread(slow.run),
                                       return_exceptions=True)
        elapsed = time.monotonic() - t0
        status = await h.stub.Status(pb.StatusRequest())

    if policy == "fail":
        assert isinstance(results[0], WorkerError) and results[0].code == grpc.StatusCode.ABORTED
        assert "round 3: client(s) 1 did not submit within the round deadline of 1.5 s" in str(results[0])
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
    assert elapsed < 20


@pytest.mark.parametrize("mode", ["bf16", "disk"])
async def test_estimator_storage_modes_keep_the_run_exact_and_bound_memory(tmp_path, mode):
    """The server's copies of G_j only serve re-sync: bf16 halves them, disk spills them to files."""
    import torch

    from efmuon.server.coordinator import ServerOptions
    from test_service_protocol import Harness, make_cfg, reference_w, run_workers

    cfg = make_cfg(workers=2, rounds=3)
    opts = ServerOptions(estimators=mode, checkpoint_dir=str(tmp_path / "ckpt"))
    async with Harness(cfg, options=opts) as h:
        await run_workers(h.worker(0), h.worker(1))
        await asyncio.wait_for(h.coordinator.finished.wait(), 10)
    est = h.coordinator.state.estimators
    assert h.coordinator.report.summary["w_sha256"] == reference_w(cfg)  # G is exact whatever the storage
    assert sorted(est) == [0, 1]
    if mode == "bf16":
        assert all(t.dtype == torch.bfloat16 for t in est[0])
        assert est.nbytes() == sum(p.numel() for p in h.coordinator.state.X) * 2 * 2
    else:
        assert len(list((tmp_path / "ckpt" / "estimators").glob("client-*-layer-*.f32"))) == 2 * len(est[0])
    assert (tmp_path / "ckpt" / "LATEST").is_file()  # the final checkpoint (estimators saved as float32)
    from efmuon.common.checkpoint import load_server

    tensors, m = load_server(tmp_path / "ckpt")
    assert m["extra"]["collecting"] == 4 and tensors["G_j/1/0"].dtype == torch.float32


async def test_nan_policy_zero_replaces_and_counts_non_finite_values():
    import math

    import torch

    from efmuon.common.compress import parse_spec
    from efmuon.common.training import parameters_of
    from efmuon.server.coordinator import ServerOptions
    from test_service_protocol import Harness, make_cfg, tiny_model

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

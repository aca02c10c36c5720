"""A federation over the network (server.cohorts, worker.cohort): the networked server samples the same
cohorts as `efmuon simulate`, catches returning clients up by min(replay, full W) and drops stragglers at
the deadline, and ends in the same bits; clients that register late or vanish keep G == mean_j G_j."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import Harness, batches_of, efmuon_cli, free_port, loss_fn, make_cfg, start, tiny_model, wait_round
from efmuon.common.federation import sample_clients, sample_cohort
from efmuon.server.cohorts import mean_estimators
from efmuon.server.options import ServerOptions
from efmuon.worker import Worker



def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return efmuon_cli(*args, timeout=timeout)


def load(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------------- the rule
def test_the_cohort_rule_over_every_client_is_simulates_and_draws_from_those_eligible():
    # Assert: all n eligible -> simulate's sample_clients, bit for bit
    for k in range(1, 40):
        assert sample_cohort(7, k, range(20), 5) == sample_clients(7, k, 20, 5)
    # ... a subset: drawn from it only, deterministic, all of it when it is no larger than m
    el = [0, 2, 3, 9, 11, 15]
    picks = sample_cohort(7, 3, el, 4)
    assert picks == sample_cohort(7, 3, list(reversed(el)), 4) and set(picks) <= set(el) and len(picks) == 4
    assert sample_cohort(7, 3, el, 10) == el


# ------------------------------------------------------------------------------------------- equal to simulate
FED = ["--task", "digits", "--clients", "20", "--participation", "0.25", "--rounds", "30", "--seed", "3",
       "--plots", "none"]


@pytest.mark.slow
def test_a_networked_federation_ends_in_simulates_bits_and_catch_up_bytes(tmp_path):
    """The acceptance run: efmuon run (real server and worker processes over 127.0.0.1) and efmuon simulate
    with the same flags: the same model, the same cohorts, and per client and round the same catch-up bytes
    (simulate's are min(replay, full W) by construction)."""
    sim = cli("simulate", *FED, "--report", str(tmp_path / "sim.json"))
    assert sim.returncode == 0, sim.stderr[-2000:]
    net = cli("run", *FED, "--report", str(tmp_path / "net.json"))
    assert net.returncode == 0, net.stdout[-2000:] + net.stderr[-3000:]
    sim, net = load(tmp_path / "sim.json"), load(tmp_path / "net.json")

    # Assert: the same model, the same cohorts
    assert net["summary"]["w_sha256"] == sim["summary"]["w_sha256"]
    assert net["summary"]["x_sha256"] == sim["summary"]["x_sha256"]
    for a, b in zip(net["rounds"], sim["rounds"]):
        assert a["cohort"] == sorted(int(j) for j in b["clients"]), a["round"]
        assert a["sampled"] == b["sampled"] == 5
    assert net["summary"]["federated"]["members"] == 20
    # ... and per client and round the same catch-up (and downlink payload)
    some = 0
    for a, b in zip(net["rounds"], sim["rounds"]):
        for j, c in b["clients"].items():
            assert a["clients"][j]["catchup"] == c["catchup"], (a["round"], j)
            assert a["clients"][j]["down"]["payload"] == c["down"]["payload"], (a["round"], j)
            some += c["catchup"] > 0
        assert a["catchup"] == b["catchup"]
    assert some > 10  # the run does exercise catch-up
    assert net["summary"]["federated"]["catchup_bytes"] == sim["summary"]["federated"]["catchup_bytes"]
    assert net["summary"]["federated"]["full_w_bytes"] == sim["summary"]["federated"]["full_w_bytes"]
    assert net["summary"]["uncompressed_bytes"] == sim["summary"]["uncompressed_bytes"]


@pytest.mark.slow
def test_stragglers_dropped_at_the_deadline_are_simulates(tmp_path):
    """Client 3 is made 120x slower (--compute-scale 1,3=120, real sleeps on the network side, the
    simulated clock in simulate): it misses every deadline it is sampled for and is told it came late.
    The fast clients pad their compute to 50 ms, 60x inside the deadline."""
    flags = ["--task", "digits", "--clients", "8", "--participation", "0.5", "--rounds", "4", "--seed", "5",
             "--deadline", "3", "--compute-seconds", "0.05", "--compute-scale", "1,3=120", "--plots", "none"]
    sim = cli("simulate", *flags, "--report", str(tmp_path / "sim.json"))
    assert sim.returncode == 0, sim.stderr[-2000:]
    net = cli("run", *flags, "--report", str(tmp_path / "net.json"))
    assert net.returncode == 0, net.stdout[-2000:] + net.stderr[-3000:]
    s, n = load(tmp_path / "sim.json"), load(tmp_path / "net.json")

    # Assert
    assert [r["dropped"] for r in n["rounds"]] == [r["dropped"] for r in s["rounds"]]
    # seed 5 samples client 3 in rounds 2 and 3: dropped in 2, and in 3 while it still computes round 2
    assert [r["dropped"] for r in s["rounds"]] == [[], [3], [3], []]
    assert n["summary"]["w_sha256"] == s["summary"]["w_sha256"]
    assert n["summary"]["federated"]["dropped"] == s["summary"]["federated"]["dropped"] > 0


# ------------------------------------------------------------------------------------------- clients come and go
class Vanishing(Worker):
    """A worker that disappears (no Leave, its connection closed) once `gone` is set."""

    def __init__(self, *a, gone: threading.Event, **kw):
        super().__init__(*a, **kw)
        self.gone = gone
        self.trace = self._check

    def _check(self, step: str) -> None:
        if self.gone.is_set():
            raise ConnectionAbortedError("vanished")

    def _leave_quietly(self, reason: str) -> None:
        pass


async def test_a_late_member_and_a_vanished_one_keep_g_the_mean_over_the_members():
    """8 client ids: 7 start, client 7 joins at round >= 10, client 6 vanishes at round >= 12. At every round
    G == mean_j G_j over the members; the late client registers and is sampled afterwards; the vanished one
    is dropped from its round (the round deadline) and from the cohorts after --client-timeout."""
    cfg = make_cfg(workers=8, rounds=26, clients=8, participation=0.5, compute_seconds=0.05)
    opts = ServerOptions(round_deadline=2.0, on_deadline="proceed", client_timeout=0.3)
    gaps: dict[int, float] = {}
    members: dict[int, int] = {}
    gone = threading.Event()
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(12))  # one thread per worker
    async with Harness(cfg, options=opts) as h:
        c = h.coordinator
        c.poll_s = 0.5  # held Exchanges come back often, so a vanished client is noticed at once

        def on_event(what, k, t0, t1):
            if what == "process":  # G after the round's aggregate and registrations (the step leaves G alone)
                gaps[k] = max(float((g - m).abs().max()) for g, m in zip(c.state.G, mean_estimators(c.state)))
                members[k] = c.state.n
        c.events = on_event
        runs = [asyncio.ensure_future(asyncio.to_thread(h.worker(j).run)) for j in range(6)]
        ghost = Vanishing(tiny_model(), loss_fn, batches_of(6), server=h.address, client_id=6,
                          configure_threads=False, gone=gone)
        runs.append(asyncio.ensure_future(asyncio.to_thread(ghost.run)))
        late = None
        vanished_at = None
        while not c.finished.is_set():
            if late is None and c.collecting >= 10:
                late = asyncio.ensure_future(asyncio.to_thread(h.worker(7).run))
                joined_at = c.collecting
            if vanished_at is None and c.collecting >= 12:
                gone.set()
                vanished_at = c.collecting
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*runs, late, return_exceptions=True)
        report = c.report.to_dict()

    # Assert: everyone but the ghost finished; G is the members' mean at every round
    assert all(isinstance(r, dict) for i, r in enumerate(results) if i != 6), results
    assert isinstance(results[6], ConnectionAbortedError)
    assert set(gaps) == set(range(0, 27)) and max(gaps.values()) < 1e-5, gaps
    # round 0 proceeded with the 7 there; client 7 registered after round 10 and took part later
    assert members[0] == 7 and members[26] == 8
    registered = min(k for k, m in members.items() if m == 8)
    assert registered >= joined_at >= 10
    rounds = {r["round"]: r for r in report["rounds"]}
    assert any(7 in rounds[k]["cohort"] for k in rounds if k > registered)
    assert all(7 not in rounds[k]["cohort"] for k in rounds if k <= registered)
    # the ghost: any round it was sampled in after vanishing dropped it; then it is never sampled again
    after = [k for k in sorted(rounds) if k > vanished_at and 6 in rounds[k]["cohort"]]
    assert all(6 in rounds[k]["dropped"] for k in after)
    assert not any(6 in rounds[k]["cohort"] for k in range(vanished_at + 8, 27)), [rounds[k]["cohort"] for k in rounds]
    assert report["summary"]["federated"]["members"] == 8
    # its G_j stays in G (the mean is over all 8 members): G_6 is frozen at what it last sent
    assert torch.isfinite(torch.cat([g.flatten() for g in c.state.G])).all()


# ------------------------------------------------------------------------------------------- a client killed
@pytest.mark.slow
def test_a_killed_server_and_a_killed_client_resume_and_keep_simulates_bits(tmp_path):
    """efmuon server (--checkpoint-every 1) and two worker processes (clients 0-6 in one, client 7 alone, each
    with --checkpoint-dir). The server is SIGKILLed at round >= 4 and resumed from its checkpoint; the workers
    reconnect by themselves. Then client 7's process is SIGKILLed at round >= 9 and started again: it resumes
    from its own checkpoint (W, M_j, G_j, the submission in flight) and the rounds it is sampled in wait for it.
    The run ends with simulate's bits."""
    flags = ["--task", "digits", "--clients", "8", "--participation", "0.5", "--rounds", "16", "--seed", "2"]
    sim = cli("simulate", *flags, "--plots", "none", "--report", str(tmp_path / "sim.json"))
    assert sim.returncode == 0, sim.stderr[-2000:]
    port = free_port()
    serve = ["server", "--host", "127.0.0.1", "--port", str(port), "--plots", "none",
             "--report", str(tmp_path / "net.json")]
    srv = start([*serve, *flags, "--checkpoint-dir", str(tmp_path / "srv"), "--checkpoint-every", "1"],
                tmp_path / "server.log")
    address = f"127.0.0.1:{port}"
    many = start(["worker", "--server", address, "--clients", "0-6", "--checkpoint-dir", str(tmp_path / "ck")],
                 tmp_path / "many.log")
    seven = ["worker", "--server", address, "--client-id", "7", "--checkpoint-dir", str(tmp_path / "ck7")]
    one = start(seven, tmp_path / "seven.log")
    procs = [srv, many, one]
    try:
        wait_round(port, 4, srv, tmp_path / "server.log", timeout=90)
        srv.send_signal(signal.SIGKILL)  # Execute: the server dies ...
        srv.wait(timeout=10)
        srv = start([*serve, "--resume", str(tmp_path / "srv")], tmp_path / "server2.log")  # ... and comes back
        procs.append(srv)
        wait_round(port, 9, srv, tmp_path / "server2.log", timeout=90)
        one.send_signal(signal.SIGKILL)  # then client 7 dies and comes back
        one.wait(timeout=10)
        again = start(seven, tmp_path / "seven.log")
        procs.append(again)
        codes = [p.wait(timeout=180) for p in (srv, many, again)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = {f.name: f.read_text() for f in tmp_path.glob("*.log")}

    # Assert
    assert codes == [0, 0, 0], {k: v[-2000:] for k, v in logs.items()}
    assert "resumed from" in logs["server2.log"]
    assert "continues from its own state" in logs["seven.log"] or "resumed from its checkpoint" in logs["seven.log"]
    net, ref = load(tmp_path / "net.json"), load(tmp_path / "sim.json")
    assert net["summary"]["w_sha256"] == ref["summary"]["w_sha256"]
    assert [r["cohort"] for r in net["rounds"]] == [sorted(int(j) for j in r["clients"]) for r in ref["rounds"]]


@pytest.mark.parametrize("policy", ["fail", "proceed"])
async def test_min_cohort_waits_for_clients_then_fails_or_proceeds(policy):
    """3 client ids, --min-cohort 3, only clients 0 and 1 start: round 0 proceeds with them (a federation
    starts with those there), then round 1 is short of the quorum and waits --round-deadline: the run fails
    naming the quorum, or (proceed) client 2 joins during the wait, registers, and the rounds go on with all 3."""
    cfg = make_cfg(workers=3, rounds=4, clients=3, participation=1.0)
    opts = ServerOptions(round_deadline=2.0, on_deadline=policy, min_cohort=3)
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(6))
    async with Harness(cfg, options=opts) as h:
        c = h.coordinator
        runs = [asyncio.ensure_future(asyncio.to_thread(h.worker(j).run)) for j in range(2)]
        if policy == "proceed":  # once round 0 closed (at its deadline) and round 1's draw waits for the quorum
            while c._processing < 0:
                await asyncio.sleep(0.005)
            runs.append(asyncio.ensure_future(asyncio.to_thread(h.worker(2).run)))
        await asyncio.wait_for(c.finished.wait(), 60)
        results = await asyncio.gather(*runs, return_exceptions=True)
        report = c.report.to_dict()

    # Assert
    if policy == "fail":
        assert c.failed is not None and "fewer than --min-cohort 3" in str(c.failed), c.failed
        assert all("fewer than --min-cohort 3" in str(r) for r in results), results
    else:
        assert c.failed is None and all(isinstance(r, dict) for r in results), results
        assert [r["cohort"] for r in report["rounds"]] == [[0, 1, 2]] * 4
        assert report["rounds"][0]["members"] == 3 and report["summary"]["federated"]["members"] == 3


# ------------------------------------------------------------------------------------------- adaptive deadline
def test_the_adaptive_deadline_is_median_plus_k_mad_capped_and_waits_for_enough_times():
    from efmuon.common.federation import AdaptiveDeadline

    d = AdaptiveDeadline(3.0, 10.0)
    d.add_round([1.0, 2.0, 3.0])
    assert d.current() == 10.0  # fewer than 10 times: the fixed deadline
    d.add_round([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])  # 10 times: median 3, MAD 1.5 -> 3 + 3 * 1.5
    assert d.current() == pytest.approx(7.5)
    d.add_round([100.0] * 20)
    assert d.current() == 10.0  # never above the cap
    assert AdaptiveDeadline(None, 4.0).current() == 4.0 and AdaptiveDeadline(2.0, None).current() is None
    for _ in range(12):  # only the last 10 rounds count
        d.add_round([1.0])
    assert d.current() == pytest.approx(1.0)


def test_an_adaptive_deadline_drops_the_slow_client_on_simulates_clock(tmp_path):
    """Client 3 is 100x slower; --adaptive-deadline 3 (no fixed deadline): the first rounds wait for it, then the
    deadline follows the fast clients' (exact, simulated) times and drops only it."""
    flags = ["--task", "digits", "--clients", "6", "--participation", "1", "--rounds", "5", "--seed", "1",
             "--adaptive-deadline", "3", "--compute-seconds", "0.01", "--compute-scale", "1,3=100", "--plots", "none"]
    sim = cli("simulate", *flags, "--report", str(tmp_path / "sim.json"))
    assert sim.returncode == 0, sim.stderr[-2000:]
    rounds = load(tmp_path / "sim.json")["rounds"]
    assert rounds[0]["deadline"] is None and rounds[0]["dropped"] == []  # 5 times known: no deadline yet
    late = [r for r in rounds if r["deadline"] is not None]
    assert late and all(r["dropped"] == [3] and r["deadline"] == pytest.approx(0.01) for r in late), rounds
    assert load(tmp_path / "sim.json")["summary"]["federated"]["adaptive_deadline"] == 3


async def test_an_adaptive_deadline_drops_the_slow_client_over_the_network():
    """The server's adaptive deadline (measured times, real sleeps): once 10 times are known it follows the fast
    clients and drops the 100x slower client 3, who is told it came late; the run completes."""
    cfg = make_cfg(workers=6, rounds=5, clients=6, participation=1.0, adaptive_deadline=3.0, compute_seconds=0.01,
                   compute_scale="1,3=100")
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(8))
    async with Harness(cfg) as h:
        workers = [h.worker(j) for j in range(6)]
        results = await asyncio.gather(*(asyncio.to_thread(w.run) for w in workers), return_exceptions=True)
        await asyncio.wait_for(h.coordinator.finished.wait(), 60)
        report = h.coordinator.report.to_dict()

    assert all(isinstance(r, dict) for r in results), results
    rounds = report["rounds"]
    assert rounds[0]["deadline"] is None and rounds[0]["dropped"] == []
    late = [r for r in rounds if r["deadline"] is not None]
    # on a loaded machine a fast client may be stretched past the deadline too: only client 3's drop is certain
    assert late and all(3 in r["dropped"] and r["deadline"] < 0.5 for r in late), rounds
    assert workers[3].late >= 1 and report["summary"]["federated"]["adaptive_deadline"] == 3

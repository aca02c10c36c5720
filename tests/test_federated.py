"""Federated `efmuon simulate`: partial participation, catch-up, stragglers, links and the simulated clock."""
from __future__ import annotations

import json

import pytest
import torch
from efmuon.cli import main
from efmuon.common.config import RunConfig, from_mapping
from efmuon.common.errors import ConfigError
from efmuon.common.federation import (
    clients_per_round,
    compute_factors,
    parse_compute_scale,
    sample_clients,
)
from efmuon.common.federation import client_links
from efmuon.common.links import PRESETS, parse_link_mix
from efmuon.simulate.federated import FederatedSim
from efmuon.simulate.sync import simulate


def _lsq(**kw) -> RunConfig:
    base = dict(task="lsq", clients=20, participation=0.25, rounds=14, uplink="topk:0.1", downlink="topk:0.02")
    base.update(kw)
    return from_mapping(base)


def _assert_G_is_mean_of_all(sim: FederatedSim) -> None:
    mean = sim.client_estimators_mean()
    for g, m in zip(sim.server.G, mean):
        torch.testing.assert_close(g, m, rtol=1e-5, atol=1e-6)
    if sim.server.estimators is not None:  # the server's copies of G_j are the clients' bits
        assert sorted(sim.server.estimators) == list(range(sim.n))
        for j, est in sim.server.estimators.items():
            assert all(torch.equal(a, b) for a, b in zip(est, sim.workers[j].Gj))


@pytest.mark.parametrize("downlink, replay_cheaper", [("topk:0.02", True), ("identity", False)])
def test_partial_participation_keeps_G_the_mean_and_catchup_replays_to_identical_W(downlink, replay_cheaper):
    sim = FederatedSim(_lsq(downlink=downlink), exact_w=True, server_estimators=True)
    assert sim.n == 20 and sim.m == 5
    sim.join()
    _assert_G_is_mean_of_all(sim)
    # Client 0 is in round 1, misses rounds 2..11 (10 rounds), and returns in round 12.
    schedule = {1: [0, 1, 2, 3, 4], 12: [0, 5, 6, 7, 8]}
    frame_len = {}
    for k in range(1, 14):
        sampled = schedule.get(k) or sample_clients(123, k, 19, 5)
        sampled = [j + 1 for j in sampled] if k not in schedule else sampled  # client 0 sits out
        before = {j: [g.clone() for g in sim.workers[j].Gj] for j in range(20) if j not in sampled}
        r = sim.round(k, sampled=sampled)
        frame_len[k] = sim.cum_frames[k] - sim.cum_frames[k - 1]
        _assert_G_is_mean_of_all(sim)
        for j, gs in before.items():  # a skipped client keeps its estimator
            assert all(torch.equal(a, b) for a, b in zip(gs, sim.workers[j].Gj))
        for j in sampled:  # every participant holds the server's W, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(sim.workers[j].W, sim.server.W)), (k, j)
        if k == 12:
            replay = sum(frame_len[i] for i in range(2, 12))
            expected = min(replay, sim.full_w_bytes)
            assert (replay < sim.full_w_bytes) == replay_cheaper
            c0 = r["clients"]["0"]
            assert c0["catchup"] == expected
            assert c0["down"]["payload"] == expected + frame_len[12]
            assert r["catchup"] >= expected
            assert r["bytes"]["down"]["payload"] == sum(c["down"]["payload"] for c in r["clients"].values())
    # the server never stored per-client W: the clients' exact W (replayed) equals it
    assert sim.workers[0].round == 12


def test_default_mode_keeps_no_W_per_client_and_matches_exact_mode():
    cfg = _lsq(rounds=8)
    a, b = FederatedSim(cfg, exact_w=True), FederatedSim(cfg)
    a.join(), b.join()
    for k in range(1, 9):
        ra, rb = a.round(k), b.round(k)
        assert ra["bytes"] == rb["bytes"] and ra["catchup"] == rb["catchup"]
    assert all(w.W is None for w in b.workers)
    assert all(torch.equal(x, y) for x, y in zip(a.server.W, b.server.W))
    assert all(torch.equal(x, y) for x, y in zip(a.server.G, b.server.G))


def test_full_participation_is_the_synchronous_run():
    cfg = RunConfig(task="lsq", workers=4, rounds=10, uplink="randk:0.2", downlink="rankk:2")
    sync = simulate(cfg, quiet=True)["summary"]["w_sha256"]
    fed = simulate(cfg.replace(clients=4, participation=1.0), quiet=True)
    assert fed["summary"]["w_sha256"] == sync
    assert fed["summary"]["federated"]["catchup_bytes"] == 0


def test_stragglers_are_dropped_and_keep_their_state():
    # dsl: 2*30 ms of latency > deadline 40 ms; wifi: 2*5 ms < 40 ms; compute fixed: reproducible.
    cfg = _lsq(link_mix="dsl=0.5,wifi=0.5", deadline=0.04, compute_seconds=0.001, rounds=6)
    sim = FederatedSim(cfg, server_estimators=True)
    slow = {j for j, (name, _) in enumerate(sim.links) if name == "dsl"}
    assert 0 < len(slow) < sim.n
    sim.join()
    seen_drop = False
    for k in range(1, 7):
        sampled = sample_clients(cfg.seed, k, sim.n, sim.m)
        before = {j: [g.clone() for g in sim.workers[j].Gj] + [m.clone() for m in sim.workers[j].M] for j in sampled}
        r = sim.round(k)
        assert set(r["dropped"]) == slow & set(sampled)
        for j in r["dropped"]:
            seen_drop = True
            after = sim.workers[j].Gj + sim.workers[j].M
            assert all(torch.equal(x, y) for x, y in zip(before[j], after))
            assert r["clients"][str(j)]["up"]["payload"] == 0
        if r["dropped"]:
            assert r["sim_seconds"] == pytest.approx(0.04)
        else:
            assert r["sim_seconds"] < 0.04
        _assert_G_is_mean_of_all(sim)
    assert seen_drop
    a = simulate(cfg, quiet=True)["summary"]
    b = simulate(cfg, quiet=True)["summary"]
    assert a["w_sha256"] == b["w_sha256"] and a["federated"]["dropped"] > 0


def test_simulated_clock_is_compute_plus_transfers():
    cfg = _lsq(clients=3, participation=None, link="up=8mbit,down=16mbit,delay=10ms", compute_seconds=0.25,
               compute_scale="2", rounds=2)
    sim = FederatedSim(cfg)
    sim.join()
    r = sim.round(1)
    for j, c in r["clients"].items():
        up, down = c["up"]["payload"], c["down"]["payload"]
        expect = 0.25 * 2 + (0.01 + down * 8 / 16e6) + (0.01 + up * 8 / 8e6)
        assert c["sim_seconds"] == pytest.approx(expect)
    assert r["sim_seconds"] == pytest.approx(max(c["sim_seconds"] for c in r["clients"].values()))
    assert r["sim_time"] == pytest.approx(sim.sim_join_seconds + r["sim_seconds"])


def test_cli_federated_report_has_links_sim_time_and_plots(tmp_path):
    path = tmp_path / "R.json"
    assert main(["simulate", "--task", "digits", "--clients", "200", "--participation", "0.05", "--link", "lte",
                 "--rounds", "4", "--report", str(path), "--log-every", "1000"]) == 0
    r = json.loads(path.read_text())
    s = r["summary"]
    assert s["sim_time"] > 0 and s["federated"]["clients"] == 200 and s["federated"]["per_round"] == 10
    assert len(s["links"]) == 200
    lte = PRESETS["lte"]
    for j, link in s["links"].items():
        assert link["up"]["configured_bps"] == lte.up_bps and link["down"]["configured_bps"] == lte.down_bps
        for d in ("up", "down"):
            assert 0 < link[d]["achieved_bps"] < link[d]["configured_bps"]  # latency costs rate
    times = [e["sim_time"] for e in r["rounds"]]
    assert all(e["sim_seconds"] > 0 and e["sampled"] == 10 for e in r["rounds"])
    assert times == sorted(times) and times[-1] == pytest.approx(s["sim_time"])
    for e in r["rounds"]:
        assert e["bytes"]["down"]["payload"] >= e["catchup"] >= 0
    assert sum(e["catchup"] for e in r["rounds"]) == s["federated"]["catchup_bytes"]
    for name in ("loss-rounds", "loss-bytes", "loss-time", "bytes-per-client"):
        png = tmp_path / f"R-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- parsing / sampling

def test_sampling_is_deterministic_and_sized():
    assert clients_per_round(0.05, 1000) == 50
    assert clients_per_round(0.001, 20) == 1
    assert clients_per_round(None, 7) == 7
    a = sample_clients(0, 3, 100, 10)
    assert a == sample_clients(0, 3, 100, 10) != sample_clients(0, 4, 100, 10)
    assert len(set(a)) == 10 and a == sorted(a)


def test_link_mix_trace_and_compute_scale(tmp_path):
    mix = parse_link_mix("dsl=0.3,lte=0.5,wifi=0.2")
    assert [m[0] for m in mix] == ["dsl", "lte", "wifi"] and sum(m[2] for m in mix) == pytest.approx(1)
    cfg = RunConfig(task="lsq", clients=1000, link_mix="dsl=0.3,lte=0.5,wifi=0.2")
    links = client_links(cfg, 1000)
    assert links == client_links(cfg, 1000)
    share = sum(1 for name, _ in links if name == "lte") / 1000
    assert 0.4 < share < 0.6
    trace = tmp_path / "t.csv"
    trace.write_text("client,up_bps,down_bps,delay_ms\n0,1e6,8e6,40\n1,5e6,2e7,10\n")
    links = client_links(RunConfig(task="lsq", link_trace=str(trace)), 3)
    assert links[1][1].up_bps == 5e6 and links[1][1].delay_s == pytest.approx(0.01)
    assert links[2][1] == links[0][1]  # clients without a row cycle through the rows
    assert parse_compute_scale("lognormal:0.5") == ("lognormal", 0.5)
    f = compute_factors("lognormal:0.5", 100, 0)
    assert f == compute_factors("lognormal:0.5", 100, 0) and min(f) < 1 < max(f)
    assert compute_factors(None, 3, 0) == [1.0] * 3


@pytest.mark.parametrize("bad, word", [
    ({"participation": 1.5}, "participation"),
    ({"participation": 0}, "participation"),
    ({"clients": 0}, "clients"),
    ({"link": "lte", "link_mix": "dsl=1"}, "at most one"),
    ({"link": "4g"}, "unknown preset"),
    ({"link_mix": "dsl=0.5,moon=0.5"}, "moon"),
    ({"compute_scale": "gamma:2"}, "compute_scale"),
    ({"deadline": -1}, "deadline"),
])
def test_bad_federated_settings_are_clear_errors(bad, word):
    with pytest.raises(ConfigError, match=word):
        from_mapping({"task": "lsq", **bad})


def test_bad_flag_is_a_clear_cli_error(capsys):
    assert main(["simulate", "--task", "lsq", "--clients", "10", "--link-mix", "dsl=x"]) == 2
    assert "link_mix" in capsys.readouterr().err

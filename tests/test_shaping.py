"""In-process link shaping for `efmuon run --link` (the worker's relay shapes its connection, no root),
the per-client `[links]` table, and the achieved-rate report (summary.links.<client>)."""
from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading

import pytest
from efmuon.common.config import RunConfig, from_mapping, load_toml
from efmuon.common.errors import ConfigError
from efmuon.common.federation import is_federated
from efmuon.common.federation import client_links
from efmuon.common.links import parse_link
from efmuon.worker import shaping, transfer
from efmuon.worker.relay import CountingRelay


def efmuon(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efmuon.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------ config
def test_links_table_overrides_link_per_client(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('link = "lte"\n[links]\n1 = "dsl"\n3 = "up=2mbit,delay=5ms"\n')

    # Act
    cfg = load_toml(str(path), RunConfig(workers=4))
    links = client_links(cfg, 4)

    # Assert
    assert [name for name, _ in links] == ["lte", "dsl", "lte", "up=2mbit,delay=5ms"]
    assert links[3][1] == parse_link("up=2mbit,delay=5ms")
    assert is_federated(from_mapping({"links": {"0": "dsl"}}))


@pytest.mark.parametrize("links, bad", [({"x": "dsl"}, "not a client id"), ({"0": "fast"}, "unknown preset"),
                                        ({"0": 5}, "link spec string")])
def test_links_table_is_validated(links, bad):
    with pytest.raises(ConfigError, match=bad):
        from_mapping({"links": links})


def test_links_table_client_out_of_range():
    cfg = from_mapping({"links": {"7": "dsl"}})
    with pytest.raises(ConfigError, match="client 7 is not one of the run's clients 0..3"):
        client_links(cfg, 4)


def test_shaping_is_validated_and_the_server_takes_links_and_federated_settings():
    from efmuon.server.app import build_coordinator

    with pytest.raises(ConfigError, match="shaping='tc' is not valid"):
        from_mapping({"shaping": "tc"})
    # `efmuon server` no longer refuses them: the workers shape their links from the run configuration,
    # and clients/participation/deadline make the server run cohorts (server.cohorts)
    c = build_coordinator(from_mapping({"task": "lsq", "link_mix": "dsl=0.5,lte=0.5", "clients": 6,
                                        "participation": 0.5, "deadline": 3.0}), quiet=True)
    try:
        assert c.cohorts and c.n == 6
    finally:
        c.executor.shutdown(wait=False)


def test_netns_without_root_says_so(monkeypatch):
    from efmuon.server import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(netns.NetnsError, match=r"--shaping netns needs root \(ip netns add\): run as root or "
                                                r"use --shaping inproc"):
        netns.check_available()


# ------------------------------------------------------------------------------------------ relay: the mechanism
# The relay's shaping checked by its arithmetic on a fake clock (conftest.RelayClock), exactly. How
# fast real transfers go is for the benchmarks: on a loaded machine they are slower, never faster.
def test_chunk_size_is_about_10_ms_of_rate_as_a_power_of_two():
    assert shaping._chunk_size(None) == 256 * 1024  # unshaped (a delay only)
    assert shaping._chunk_size(1e3) == 1024  # at least 1 KiB
    assert shaping._chunk_size(1e6) == 1024  # 10 ms = 1250 B
    assert shaping._chunk_size(20e6) == 16384  # 25 kB
    assert shaping._chunk_size(100e6) == 65536  # 125 kB
    assert shaping._chunk_size(10e9) == 1 << 20  # at most 1 MiB


def test_token_bucket_starts_empty_caps_idle_credit_and_credits_oversleep(relay_clock):
    bucket = shaping._TokenBucket(8e6, 10_000)  # 1 MB/s, a cap of 10 ms

    # Act / Assert: it starts empty, so the first bytes wait for their own time at the rate
    assert bucket.charge(1000) == pytest.approx(0.001, abs=1e-9)
    relay_clock.t += 0.001
    assert bucket.charge(500) == pytest.approx(0.0005, abs=1e-9)
    # idle for 1 s: the credit stops at the cap (10 kB), it does not grow to 1 MB
    relay_clock.t += 0.0005 + 1.0
    assert bucket.charge(10_000) == 0.0
    assert bucket.charge(2_000) == pytest.approx(0.002, abs=1e-9)
    # the sleep overshoots by 3 ms: those 3 kB are credited to the next chunk (debt accounting), so a
    # late wake-up does not lower the rate
    relay_clock.t += 0.002 + 0.003
    assert bucket.charge(5_000) == pytest.approx(0.002, abs=1e-9)


async def test_rate_pump_waits_for_every_chunk_and_is_never_ahead_of_the_rate(relay_clock):
    # Prepare: 64 KiB + 100 B waiting at the source; the pump reads chunks of 10 ms of rate
    rate = 1e6
    data = random.Random(0).randbytes(64 * 1024 + 100)
    src, feed = socket.socketpair()
    dst, out = socket.socketpair()
    src.setblocking(False)
    dst.setblocking(False)
    feed.sendall(data)
    feed.shutdown(socket.SHUT_WR)
    sent, read = [], []
    t0 = relay_clock.t

    # Act
    await shaping.pump_rate(src, dst, rate, read.append, lambda n: sent.append((relay_clock.t, n)))
    got = b"".join(iter(lambda: out.recv(1 << 20), b""))
    for s in (src, feed, dst, out):
        s.close()

    # Assert: every byte, in chunks of 1 KiB; each chunk waited for exactly its own bytes at the rate
    assert got == data and sum(read) == len(data)
    assert [n for _, n in sent] == [1024] * 64 + [100]
    assert relay_clock.sleeps == pytest.approx([n * 8 / rate for _, n in sent], abs=1e-9)
    assert relay_clock.t - t0 == pytest.approx(len(data) * 8 / rate, rel=1e-9)
    total = 0
    for t, n in sent:  # by every forward, no more than rate x elapsed time went out
        total += n
        assert total * 8 <= rate * (t - t0) * (1 + 1e-9)


def test_transfer_meter_arithmetic():
    m = transfer._Meter()
    # a sender's transfer: data reads from the first to the last; small reads (control frames) are
    # counted in the total but neither start nor extend a transfer
    assert not m.on_bytes(100, 1.0)
    assert m.on_bytes(1000, 2.0) and m.on_bytes(3000, 2.5)
    assert not m.on_bytes(10, 2.7)
    assert m.take(receiver=False) == (4000, 0.5)
    assert m.take(receiver=False) is None  # taken: reset
    # a receiver cannot see how long the first chunk took: seconds scale by bytes / (bytes - first)
    m.on_bytes(1000, 10.0)
    m.on_bytes(3000, 11.0)
    assert m.take(receiver=True) == (4000, pytest.approx(4000 / 3000))
    m.on_bytes(1000, 12.0)
    assert m.take(receiver=True) == (1000, 0.0)  # one chunk alone: no duration to see
    assert m.total == 100 + 1000 + 3000 + 10 + 1000 + 3000 + 1000


# ------------------------------------------------------------------------------------------ relay: real sockets
def _sink_server():
    """Accepts one connection, reads everything, echoes 2 MB back after the client half-closes."""
    ls = socket.create_server(("127.0.0.1", 0))

    def serve():
        c, _ = ls.accept()
        while c.recv(1 << 20):
            pass
        c.sendall(b"y" * 2_000_000)
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    return ls


def test_relay_transfers_are_exact_and_never_measured_above_the_rate():
    ls = _sink_server()
    with CountingRelay("127.0.0.1", ls.getsockname()[1], link="up=20mbit,down=20mbit") as relay_:
        c = socket.create_connection(relay_.address)
        c.sendall(b"x" * 2_000_000)
        c.shutdown(socket.SHUT_WR)
        got = 0
        while (b := c.recv(1 << 20)):  # to EOF: the relay forwards it after the last chunk was timed
            got += len(b)
        c.close()

        # Act
        t = relay_.take_transfers()

    # Assert: the bytes exactly, both ways. The rate has an upper bound only: a transfer can beat the
    # rate by at most the bucket's idle credit (its cap, 10 ms of rate = 25 kB) over its 2 MB, 1.3 %;
    # a loaded machine makes it slower, never faster
    assert got == 2_000_000
    up_bytes, up_s = t["up"]
    down_bytes, down_s = t["down"]
    assert up_bytes == 2_000_000 and down_bytes == 2_000_000
    assert up_s > 0 and down_s > 0
    assert up_bytes * 8 / up_s <= 20e6 * 1.02
    assert down_bytes * 8 / down_s <= 20e6 * 1.02
    ls.close()


# ------------------------------------------------------------------------------------------ efmuon run
# (rate, lsq d_in, d_out): a full model of about 0.5 s at the rate (identity both ways, one worker); the two
# ends of the relay's chunk sizes (1 KiB and 64 KiB, test_chunk_size_is_about_10_ms_of_rate_as_a_power_of_two)
RATES = [(1e6, 128, 160), (100e6, 1024, 1536)]


@pytest.mark.slow
@pytest.mark.parametrize("rate, d_in, d_out", RATES, ids=["1mbit", "100mbit"])
def test_run_inproc_reports_the_links_and_an_achieved_rate_never_above_the_configured_one(tmp_path, rate, d_in,
                                                                                           d_out):
    spec = f"up={rate / 1e6:g}mbit,down={rate / 1e6:g}mbit"
    config = tmp_path / "links.toml"
    config.write_text(f'[links]\n0 = "{spec}"\n')  # the per-client table (client 0 = the only worker)
    report = tmp_path / "r.json"

    # Act
    run = efmuon("run", "--task", "lsq", "--task-option", f"d_in={d_in}", "--task-option", f"d_out={d_out}",
                 "--task-option", f"rows={d_in}", "--workers", "1", "--rounds", "1", "--uplink", "identity",
                 "--downlink", "identity", "--config", str(config), "--report", str(report), "--plots", "none")

    # Assert
    assert run.returncode == 0, run.stderr
    s = json.loads(report.read_text())["summary"]
    link = s["links"]["0"]
    assert s["links_shaping"] == "inproc" and link["mechanism"] == "relay" and link["profile"] == spec
    full = 4 * d_in * d_out
    for d in ("up", "down"):
        side = link[d]
        assert side["configured_bps"] == rate
        # round 0 (init gradient up, S_1 down) and round 1 (up); the join (W down) is apart
        assert side["transfers"] == (2 if d == "up" else 1) and side["bytes"] >= side["transfers"] * full
        assert side["join"]["transfers"] == (1 if d == "down" else 0)
        # an upper bound only (a loaded machine is slower, never faster): a transfer beats the rate
        # by at most the bucket's idle credit (10 ms of rate) and one chunk, under 3 % of a full model
        assert 0 < side["achieved_bps"] <= rate * 1.05, (d, side)
    assert "link   0 relay" in run.stdout

"""In-process link shaping for `efmuon run --link` (the worker's relay shapes its connection, no root),
the per-client `[links]` table, and the achieved-rate report (summary.links.<client>)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from efmuon.common.config import RunConfig, from_mapping, load_toml
from efmuon.common.errors import ConfigError
from efmuon.common.federation import is_federated
from efmuon.common.federation import client_links
from efmuon.common.links import parse_link
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


def test_shaping_is_validated_and_server_refuses_links():
    from efmuon.server.app import build_coordinator

    with pytest.raises(ConfigError, match="shaping='tc' is not valid"):
        from_mapping({"shaping": "tc"})
    with pytest.raises(ConfigError, match="efmuon worker --link"):
        build_coordinator(from_mapping({"task": "lsq", "link": "dsl"}))


def test_netns_without_root_says_so(monkeypatch):
    from efmuon.server import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(netns.NetnsError, match=r"--shaping netns needs root \(ip netns add\): run as root or "
                                                r"use --shaping inproc"):
        netns.check_available()


# ------------------------------------------------------------------------------------------ relay timing
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


def test_relay_transfer_timing_matches_the_configured_rate():
    ls = _sink_server()
    with CountingRelay("127.0.0.1", ls.getsockname()[1], link="up=20mbit,down=20mbit") as relay:
        c = socket.create_connection(relay.address)
        c.sendall(b"x" * 2_000_000)
        c.shutdown(socket.SHUT_WR)
        got = 0
        while (b := c.recv(1 << 20)):
            got += len(b)
        c.close()
        time.sleep(0.05)

        # Act
        t = relay.take_transfers()

    # Assert: both directions at 20 Mbit/s within 5 %, bytes exact
    assert got == 2_000_000
    up_bytes, up_s = t["up"]
    down_bytes, down_s = t["down"]
    assert up_bytes == 2_000_000 and down_bytes == 2_000_000
    assert up_bytes * 8 / up_s == pytest.approx(20e6, rel=0.05)
    assert down_bytes * 8 / down_s == pytest.approx(20e6, rel=0.05)
    ls.close()


# ------------------------------------------------------------------------------------------ efmuon run
# (rate, lsq d_in, d_out): a full model of about 0.5 s at the rate (identity both ways, one worker)
RATES = [(1e6, 128, 160), (10e6, 512, 320), (100e6, 1024, 1536)]


@pytest.mark.parametrize("rate, d_in, d_out", RATES, ids=["1mbit", "10mbit", "100mbit"])
def test_run_inproc_achieved_rate_within_10_percent(tmp_path, rate, d_in, d_out):
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
        assert side["achieved_bps"] == pytest.approx(rate, rel=0.10), (d, side)
    assert "link   0 relay" in run.stdout

"""PNG plots next to a report, and `efmuon compare`."""
from __future__ import annotations

import json

import pytest
from efmuon.cli import main
from efmuon.common.plots import per_client_bytes, series, write_plots

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    paths = []
    for name, up, down in (("identity", "identity", "identity"), ("topk", "topk:0.1", "topk:0.1")):
        path = d / f"{name}.json"
        assert main(["simulate", "--task", "lsq", "--workers", "3", "--rounds", "25", "--uplink", up,
                     "--downlink", down, "--report", str(path), "--log-every", "1000"]) == 0
        paths.append(path)
    return d, paths


def test_simulate_writes_plots_next_to_the_report(two_reports):
    d, paths = two_reports
    for name in ("loss-rounds", "loss-bytes", "loss-time", "bytes-per-client"):
        assert (d / f"topk-{name}.png").read_bytes()[:8] == PNG
    r = json.loads(paths[1].read_text())
    ser = series(r)
    assert ser["round"][0] == 0 and ser["round"][-1] == 25  # the initial model, then every round
    assert ser["bytes"] == sorted(ser["bytes"]) and ser["time_label"] == "wall time (s)"
    assert ser["bytes"][-1] == sum(r["summary"]["bytes"][d]["payload"] for d in ("up", "down"))
    pcb = per_client_bytes(r)
    assert sorted(pcb) == ["0", "1", "2"]
    assert sum(u for u, _ in pcb.values()) == r["summary"]["bytes"]["up"]["payload"]
    assert sum(d for _, d in pcb.values()) == r["summary"]["bytes"]["down"]["payload"]


def test_plots_none_disables_and_dir_redirects(tmp_path):
    rep = tmp_path / "a" / "r.json"
    assert main(["simulate", "--task", "lsq", "--workers", "2", "--rounds", "3", "--report", str(rep),
                 "--plots", "none", "--log-every", "1000"]) == 0
    assert not list((tmp_path / "a").glob("*.png"))
    assert main(["simulate", "--task", "lsq", "--workers", "2", "--rounds", "3", "--report", str(rep),
                 "--plots", str(tmp_path / "p"), "--log-every", "1000"]) == 0
    assert len(list((tmp_path / "p").glob("r-*.png"))) == 4


def test_compare_writes_a_png_and_prints_a_table(two_reports, tmp_path, capsys):
    _, paths = two_reports
    out = tmp_path / "compare.png"
    assert main(["compare", *map(str, paths), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "final loss_w" in lines[0] and "bytes up" in lines[0] and "vs uncompressed" in lines[0]
    assert any(l.startswith("identity") for l in lines) and any(l.startswith("topk") for l in lines)
    assert "x less" in text


def test_compare_rejects_a_non_report(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert main(["compare", str(bad), "--out", str(tmp_path / "c.png")]) == 2
    assert "not an efmuon report" in capsys.readouterr().err


def test_service_shaped_report_uses_wire_and_per_round_clients(tmp_path):
    def b(p, w):
        return {"up": {"payload": p, "message": p + 10, "wire": w}, "down": {"payload": p, "message": p + 10, "wire": w}}
    rounds = [{"round": k, "loss_w": 2.0 / k, "loss_x": 1.9 / k, "seconds": 0.1, "bytes": b(200, 300),
               "clients": {str(j): b(100, 150) for j in range(2)}} for k in range(1, 6)]
    rep = {"config": {"task": "lsq", "uplink": "topk:0.1", "downlink": "topk:0.1", "workers": 2},
           "rounds": rounds,
           "summary": {"rounds": 5, "bytes": b(1000, 1500), "init_bytes": b(0, 0), "workers": 2,
                       "init_clients": {}, "uncompressed_bytes": {"up": 5000, "down": 5000}}}
    ser = series(rep)
    assert ser["level"] == "wire" and ser["bytes"][-1] == 5 * 600
    assert per_client_bytes(rep) == {"0": (750, 750), "1": (750, 750)}
    paths = write_plots(rep, str(tmp_path), "svc")
    assert len(paths) == 4 and all(open(p, "rb").read(8) == PNG for p in paths)


def test_many_clients_plot_a_histogram(tmp_path):
    links = {str(j): {"up": {"bytes": 1000 + 10 * j}, "down": {"bytes": 5000 + j}} for j in range(300)}
    rep = {"config": {"task": "digits"}, "rounds": [
        {"round": k, "loss_w": 1.0 / k, "loss_x": None, "seconds": 0.1, "sim_time": 0.5 * k,
         "bytes": {"up": {"payload": 10}, "down": {"payload": 20}}} for k in range(1, 4)],
        "summary": {"rounds": 3, "links": links, "bytes": {"up": {"payload": 30}, "down": {"payload": 60}},
                    "federated": {"clients": 300, "per_round": 15}}}
    assert series(rep)["time_label"] == "simulated time (s)"
    paths = write_plots(rep, str(tmp_path), "fed")
    assert all(open(p, "rb").read(8) == PNG for p in paths)

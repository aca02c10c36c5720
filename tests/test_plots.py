"""PNG plots next to a report, and `efmuon compare`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from efmuon.cli import main
from efmuon.common.plots import (
    DROPPED,
    NO_RECORD,
    NOT_SAMPLED,
    SUBMITTED,
    catchup_series,
    participation,
    per_client_bytes,
    series,
    write_plots,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG


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
    assert len(paths) == 5 and all(_png(p) for p in paths)  # per-round clients: a participation raster too
    assert paths[-1].endswith("svc-participation.png")
    assert (participation(rep).state == SUBMITTED).all()  # everyone took part in every round
    assert catchup_series(rep) is None  # no catch-up bytes, no catch-up figure


def test_many_clients_plot_a_histogram(tmp_path):
    links = {str(j): {"up": {"bytes": 1000 + 10 * j}, "down": {"bytes": 5000 + j}} for j in range(300)}
    rep = {"config": {"task": "digits"}, "rounds": [
        {"round": k, "loss_w": 1.0 / k, "loss_x": None, "seconds": 0.1, "sim_time": 0.5 * k,
         "bytes": {"up": {"payload": 10}, "down": {"payload": 20}}} for k in range(1, 4)],
        "summary": {"rounds": 3, "links": links, "bytes": {"up": {"payload": 30}, "down": {"payload": 60}},
                    "federated": {"clients": 300, "per_round": 15}}}
    assert series(rep)["time_label"] == "simulated time (s)"
    paths = write_plots(rep, str(tmp_path), "fed")
    assert len(paths) == 4 and all(_png(p) for p in paths)  # no per-round clients: no participation plot


# ---------------------------------------------------------------------------- participation and catch-up

def _fed_round(k, clients, dropped=(), catchup=0, **extra):
    """A federated round entry as simulate writes it (and the server will): `clients` only for the sampled."""
    return {"round": k, "loss_w": 1.0 / k, "loss_x": None, "seconds": 0.1, "sim_time": 0.5 * k,
            "bytes": {"up": {"payload": 10 * len(clients)}, "down": {"payload": 100 * len(clients) + catchup}},
            "sampled": len(clients), "dropped": list(dropped), "catchup": catchup,
            "clients": {str(j): {"up": {"payload": 10}, "down": {"payload": 100}, "catchup": 0,
                                 "dropped": j in dropped, **extra} for j in clients}}


def test_participation_matrix_of_a_hand_built_report():
    rounds = [_fed_round(1, [0, 2], sim_seconds=0.3),
              _fed_round(2, [1, 2], dropped=[2], catchup=40, sim_seconds=0.2),
              _fed_round(3, [0, 3])]
    rounds[2]["clients"]["3"]["dropped"] = True  # a client entry's own flag, without the round's list
    del rounds[2]["dropped"]
    del rounds[1]["clients"]["1"]["sim_seconds"]  # the server may leave it out
    rounds[0]["clients"]["0"]["queue_ms"] = 7  # extra keys are ignored
    rep = {"config": {"task": "lsq"}, "rounds": rounds,
           "summary": {"federated": {"clients": 5, "per_round": 2}}}
    part = participation(rep)
    assert part.rounds == [1, 2, 3] and part.clients == ["0", "1", "2", "3", "4"]  # n from the summary
    S, D, A = SUBMITTED, DROPPED, NOT_SAMPLED
    assert part.state.tolist() == [[S, A, S],   # client 0
                                   [A, S, A],   # client 1
                                   [S, D, A],   # client 2: dropped in round 2 (the round's list)
                                   [A, A, D],   # client 3: dropped in round 3 (its entry's flag)
                                   [A, A, A]]   # client 4: never sampled
    assert part.cohort().tolist() == [2, 2, 2] and part.count(DROPPED) == 2
    cu = catchup_series(rep)
    assert cu["round"] == [1, 2, 3] and cu["catchup"] == [0, 40, 0] and cu["cum_catchup"] == [0, 40, 40]
    assert cu["cum_down"] == [200, 440, 640]


def test_participation_gaps_skipped_clients_and_catchup_from_clients():
    rounds = [_fed_round(1, [0, 1]), _fed_round(3, [0])]  # round 2 has no entry: no record
    rounds[1]["skipped_clients"] = [1]  # the server's partial round: client 1 missed the deadline
    rounds[1]["clients"]["0"]["catchup"] = 30
    del rounds[1]["catchup"]  # catch-up summed over the clients when the round has no total
    rep = {"rounds": rounds, "summary": {}}
    part = participation(rep)
    assert part.rounds == [1, 2, 3] and part.clients == ["0", "1"]  # n from the largest id seen
    assert part.state[:, 1].tolist() == [NO_RECORD, NO_RECORD]
    assert part.state[:, 2].tolist() == [SUBMITTED, DROPPED]
    assert catchup_series(rep)["catchup"] == [0, 30]
    for r in rounds:
        del r["clients"]
    assert participation(rep) is None  # no per-round clients: nothing to draw


def test_federated_simulate_writes_participation_and_catchup_plots(tmp_path):
    path = tmp_path / "F.json"
    assert main(["simulate", "--task", "lsq", "--clients", "8", "--participation", "0.25", "--rounds", "6",
                 "--deadline", "0.05", "--compute-seconds", "0.03", "--compute-scale", "lognormal:1",
                 "--report", str(path), "--log-every", "1000"]) == 0
    r = json.loads(path.read_text())
    for name in ("participation", "catchup"):
        assert _png(tmp_path / f"F-{name}.png")
    part = participation(r)
    assert part.state.shape == (8, 6) and (part.cohort() == r["summary"]["federated"]["per_round"]).all()
    assert part.count(DROPPED) == r["summary"]["federated"]["dropped"] > 0  # fixed compute: reproducible drops
    for c, e in enumerate(r["rounds"]):
        assert np.flatnonzero(part.state[:, c] == DROPPED).tolist() == sorted(e["dropped"])
        assert sorted(np.flatnonzero(part.state[:, c] != NOT_SAMPLED).tolist()) == sorted(map(int, e["clients"]))
    assert sum(catchup_series(r)["catchup"]) == r["summary"]["federated"]["catchup_bytes"] > 0


def test_a_report_without_per_round_clients_gets_no_participation_plot(tmp_path):
    rep = tmp_path / "s.json"
    assert main(["simulate", "--task", "lsq", "--workers", "2", "--rounds", "3", "--report", str(rep),
                 "--log-every", "1000"]) == 0
    r = json.loads(rep.read_text())
    assert participation(r) is None and catchup_series(r) is None
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        f"s-{n}.png" for n in ("bytes-per-client", "loss-bytes", "loss-rounds", "loss-time")]


def test_participation_raster_for_many_clients_and_rounds(tmp_path):
    n, R, m = 300, 250, 15
    rng = np.random.default_rng(0)
    rounds = []
    for k in range(1, R + 1):
        s = sorted(rng.choice(n, m, replace=False).tolist())
        rounds.append(_fed_round(k, s, dropped=s[:1], catchup=50 * (k % 3)))
    rep = {"config": {"task": "digits"}, "rounds": rounds,
           "summary": {"federated": {"clients": n, "per_round": m}}}
    part = participation(rep)
    assert part.state.shape == (n, R) and part.count(DROPPED) == R and part.count(SUBMITTED) == R * (m - 1)
    paths = write_plots(rep, str(tmp_path), "big")
    assert [p.rsplit("-", 1)[1] for p in paths[-2:]] == ["participation.png", "catchup.png"]
    assert all(_png(p) for p in paths)


def test_a_rounds_cohort_says_who_was_sampled_when_the_server_names_it():
    """The networked server's cohort rounds name their `cohort`; its `clients` may also hold bytes of others
    (a late uplink counted in the oldest open round, the final `done` replies): they were not sampled."""
    bytes_ = {"up": {"payload": 1}, "down": {"payload": 1}}
    rep = {"summary": {"workers": 4}, "rounds": [
        {"round": 1, "cohort": [0, 1], "dropped": [1], "clients": {"0": bytes_, "1": bytes_, "3": bytes_}},
        {"round": 2, "cohort": [2], "dropped": [], "clients": {"0": bytes_, "1": bytes_, "2": bytes_, "3": bytes_}}]}

    part = participation(rep)

    assert part.state[:, 0].tolist() == [SUBMITTED, DROPPED, NOT_SAMPLED, NOT_SAMPLED]
    assert part.state[:, 1].tolist() == [NOT_SAMPLED, NOT_SAMPLED, SUBMITTED, NOT_SAMPLED]

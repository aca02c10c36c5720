"""Smoke tests of `efmuon bench NAME` through run_bench at the smoke level (tiny sizes, one repeat,
seconds): the report's structure, the table, the goals, and that the figures are finite numbers
(positive where they must be). Never a timing's value: the machine is shared and noisy, and smoke
figures mean nothing."""
import json
import math

import pytest
from efmuon.benchmarks import run_bench
from efmuon.benchmarks.harness import BENCHES

# per bench: keys every result row has, and those of them that must be > 0
ROWS = {
    "bytes": (lambda r: r["rows"], {"method", "uplink", "downlink", "rounds", "final_val_loss_w"}, {"rounds"}),
    "bytes-10m": (lambda r: r["rows"], {"pairing", "uplink", "downlink", "rounds_to_target", "saving_total_x",
                                        "bits_per_param_up", "bits_per_param_down", "final_val_loss_w"},
                  {"bits_per_param_up", "bits_per_param_down"}),
    "methods": (lambda r: r, {"task", "method", "final_loss_w", "up_MB", "down_MB"}, {"up_MB", "down_MB"}),
    "codecs": (lambda r: r, {"threads", "codec", "frame_MB", "encode_ms", "decode_ms", "x_clone"},
               {"frame_MB", "encode_ms", "decode_ms", "x_clone"}),
    "lmo": (lambda r: r, {"device", "layers", "ms_per_step", "ns_GFLOPs", "x_matmul"},
            {"ms_per_step", "ns_GFLOPs", "x_matmul"}),
    "transport": (lambda r: r, {"size", "payload", "wire_up", "wire/payload", "raw_MBps", "x_raw_relay",
                                "x_raw_direct", "x_raw_bare_stream"},
                  {"payload", "wire_up", "raw_MBps", "x_raw_relay", "x_raw_direct", "x_raw_bare_stream"}),
    "scaling": (lambda r: r, {"clients", "workers", "round_s", "server_cpu_s", "recv_s", "decode_s", "lmo_s",
                              "send_s", "process_s", "compute_busy_s", "busy_per_round", "processed_rounds",
                              "replies", "submissions"},
                {"round_s", "decode_s", "lmo_s", "process_s", "compute_busy_s", "processed_rounds", "replies"}),
    "moe": (lambda r: r["rows"], {"optimizer", "rounds", "rounds_to_target", "final_val_loss_w"}, {"rounds"}),
    "scaling-shards": (lambda r: r, {"shards", "workers", "round_s", "shard_round_s", "shard_solo_busy_s",
                                     "max_solo_busy_s", "expected_speedup_own_machines", "processed_rounds",
                                     "submissions", "shard_layers"},
                       {"round_s", "max_solo_busy_s", "expected_speedup_own_machines", "processed_rounds",
                        "submissions"}),
    "memory": (lambda r: r, {"params", "model_MB", "idle_MB", "server_peak_MB", "worker_peak_MB",
                             "server_copies", "worker_copies"}, {"params", "idle_MB", "server_peak_MB",
                                                                 "worker_peak_MB"}),
    "rounds": (lambda r: r["rows"], {"variant", "uplink", "downlink", "lr", "beta", "layers", "rounds_to_target",
                                     "total_MB_per_worker", "rounds_x_default", "bytes_x_default",
                                     "rounds_x_identity", "bytes_x_identity"},
               {"rounds_to_target", "total_MB_per_worker", "rounds_x_default", "bytes_x_identity"}),
    "lr-robustness": (lambda r: r, {"preset", "x_tuned", "lr", "final_val_loss_w", "diverged", "seconds"},
                      {"lr", "x_tuned"}),
    "profile": (lambda r: r["rows"], {"model", "workers", "rounds", "phase", "key", "efmuon_s", "share", "ddp_s"},
                {"workers", "rounds"}),
}


def check_profile(result: dict) -> None:
    """bench profile: every phase of both sides, none negative, and the intervals it adds up inside a round."""
    from efmuon.benchmarks.profile import DDP_ROWS, PHASES, WORKER_PHASES

    for m in result["models"]:
        rows = {r["key"]: r for r in result["rows"] if r["model"] == m["model"]}
        assert set(rows) == {k for k, _, _ in PHASES} | {f"ddp_{k}" for k, _ in DDP_ROWS}
        for key, _, ddp in PHASES:
            assert rows[key]["efmuon_s"] is not None and rows[key]["efmuon_s"] >= 0, key
            assert (rows[key]["ddp_s"] is not None) == (ddp is not None), key
        assert all(rows[f"ddp_{k}"]["ddp_s"] > 0 for k, _ in DDP_ROWS)
        assert rows["round"]["efmuon_s"] == m["round_s"] and rows["round"]["ddp_s"] == m["ddp_step_s"]
        assert m["round/ddp"] == pytest.approx(m["round_s"] / m["ddp_step_s"])
        assert len(m["per_round"]) == m["rounds"] >= 1
        for r in m["per_round"]:
            wall = r["wall_s"]  # the step of S_k to the step of S_{k+1}; the report's seconds end inside it
            assert 0 < r["round_s"] <= wall
            assert set(map(int, r["workers"])) == set(range(m["workers"]))  # JSON keys
            for w in r["workers"].values():
                assert all(w[p] >= 0 for p in (*WORKER_PHASES, "received_s_k")), w
                # receiving S_k .. its submission in: inside the round
                assert w["received_s_k"] + w["apply"] + w["gradient"] + w["encode"] + w["sending"] <= wall + 1e-9
            srv = r["server"]
            assert len(srv["decode"]) == m["workers"] and min(srv["decode"]) >= 0
            assert min(srv["idle"], srv["barrier"], srv["aggregate"], srv["step"]) >= 0
            assert srv["step"] + srv["idle"] + srv["barrier"] <= wall + 1e-9
            crit = r["crit"]
            assert min(crit["compute"], crit["transfer"], crit["other"]) >= 0
            assert crit["compute"] + crit["transfer"] + crit["other"] == pytest.approx(wall)


CHECKS = {"profile": check_profile}  # more than the rows' structure
# Real networked runs (a server and worker processes each, ~10 s apiece even at the smoke level, over
# this file's budget): their runs are tested end to end elsewhere (test_service_e2e, test_service_cli).
# By hand: run_bench("bytes-wire" / "soak" / "startup", True, None, None, "", smoke=True); startup's
# two ways of starting workers are tested in tests/test_spawn.py.
NETWORKED_RUNS = {"bytes-wire", "federation", "peers", "pipeline", "soak", "startup"}  # peers: tests/test_peers.py


def test_every_bench_has_a_smoke_test():
    assert set(ROWS) | NETWORKED_RUNS == set(BENCHES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROWS))
def test_bench_smoke_structure(name, tmp_path):
    report = tmp_path / f"{name}.json"
    md = tmp_path / "BENCHMARKS.md"
    out = run_bench(name, True, str(report), str(md), f"efmuon bench {name} --quick", smoke=True)
    data = json.loads(report.read_text())
    assert data["bench"] == name and data["quick"] is True and data["smoke"] is True
    for g in data["goals"]:
        assert set(g) == {"name", "value", "goal", "met"}
        assert isinstance(g["met"], bool) and g["name"] and g["goal"]
    if name != "methods":  # methods compares side by side, without goals
        assert data["goals"], "goals list is empty"
    assert out["table"].strip() and "|---|" in out["table"]
    rows_of, keys, positive = ROWS[name]
    rows = rows_of(data["result"])
    assert rows
    for row in rows:
        assert keys <= set(row), f"missing keys: {keys - set(row)}"
        for k, v in row.items():
            if isinstance(v, float):
                assert math.isfinite(v), f"{k} = {v}"
        for k in positive:
            assert row[k] > 0, f"{k} = {row[k]}"
    text = md.read_text()
    assert f"<!-- bench:{name} -->" in text and f"<!-- /bench:{name} -->" in text
    if name in CHECKS:
        CHECKS[name](data["result"])

"""`efmuon bench rounds` (benchmarks/rounds.py): its count of rounds and bytes is `efmuon simulate`'s, and its
ratios are against the first two rows. The bench's smoke run is in tests/test_bench_smoke.py."""
from __future__ import annotations

import pytest
from efmuon.benchmarks import rounds
from efmuon.benchmarks.algorithm import _rounds_to
from efmuon.benchmarks.peers import _efmuon_cfg, level_setup, sim_rounds_to_target
from efmuon.simulate.sync import simulate


def test_sim_rounds_to_target_counts_the_payload_as_simulate_reports_it():
    # Arrange: peers' smoke setup with a per-layer rule, a retuned lr / beta and a target reached after round 2
    setup = {**level_setup("smoke"), "target": 4.2}
    extra = {"lr": 0.1, "beta": 0.5, "uplink_layers": {"wte.weight": "quant:8:256"}}

    # Act
    r = sim_rounds_to_target((setup, "quant:3:256", "sign:256", extra))
    rep = simulate(_efmuon_cfg(setup, "quant:3:256", "sign:256", setup["max_steps"], **extra), quiet=True)

    # Assert: the same round as simulate's report, and the same payload to it (join phase included)
    assert r["reached"]
    rnd, up, down = _rounds_to(rep, setup["target"])
    assert r["round"] == rnd
    assert r["up_MB_per_worker"] == pytest.approx(up / setup["workers"] / 1e6, rel=1e-12)
    assert r["down_MB_per_worker"] == pytest.approx(down / setup["workers"] / 1e6, rel=1e-12)
    assert rep["config"]["lr"] == 0.1 and rep["config"]["beta"] == 0.5


def test_rows_compare_every_variant_to_the_default_and_identity():
    # Arrange
    variants = [("default", "quant:3:256", "sign:256", {"lr": 0.05, "beta": 0.15}),
                ("identity", "identity", "identity", {"lr": 0.05, "beta": 0.15}),
                ("tuned", "quant:3:256", "sign:256", {"lr": 0.1, "beta": 0.5, "uplink_layers": {"wte.weight": "quant:8"}}),
                ("never", "quant:2", "sign", {})]
    results = [{"round": 140, "reached": True, "val_loss": 1.89, "up_MB_per_worker": 7.0, "down_MB_per_worker": 3.0},
               {"round": 100, "reached": True, "val_loss": 1.88, "up_MB_per_worker": 50.0, "down_MB_per_worker": 50.0},
               {"round": 70, "reached": True, "val_loss": 1.9, "up_MB_per_worker": 4.0, "down_MB_per_worker": 1.0},
               {"round": 300, "reached": False, "val_loss": 2.5, "up_MB_per_worker": 9.0, "down_MB_per_worker": 4.0}]

    # Act
    rows = rounds.rows_of(variants, results)

    # Assert
    tuned, never = rows[2], rows[3]
    assert tuned["rounds_x_default"] == 0.5 and tuned["bytes_x_default"] == 0.5
    assert tuned["rounds_x_identity"] == 0.7 and tuned["bytes_x_identity"] == 0.05
    assert tuned["lr"] == 0.1 and tuned["beta"] == 0.5 and tuned["layers"] == "up wte.weight=quant:8"
    assert rows[0]["rounds_x_default"] == 1.0 and rows[1]["bytes_x_identity"] == 1.0
    assert never["rounds_to_target"] is None and never["total_MB_per_worker"] is None
    assert never["rounds_x_default"] is None and never["bytes_x_identity"] is None


def test_rows_at_another_seed_compare_to_the_references_at_that_seed():
    # Arrange: the default and a tuned variant at seed 1; identity ran at seed 0 only
    old, new = {"lr": 0.05, "beta": 0.15}, {"lr": 0.1, "beta": 0.5}
    variants = [("default", "quant:3:256", "sign:256", old), ("identity", "identity", "identity", old),
                ("default s1", "quant:3:256", "sign:256", {**old, "seed": 1}),
                ("tuned s1", "quant:3:256", "sign:256", {**new, "seed": 1})]
    results = [{"round": r, "reached": True, "val_loss": 1.9, "up_MB_per_worker": mb, "down_MB_per_worker": 0.0}
               for r, mb in ((140, 10.0), (100, 100.0), (160, 12.0), (120, 9.0))]

    # Act
    rows = rounds.rows_of(variants, results)

    # Assert
    assert rows[3]["seed"] == 1 and rows[3]["rounds_x_default"] == 0.75 and rows[3]["bytes_x_default"] == 0.75
    assert rows[2]["rounds_x_default"] == 1.0
    assert rows[3]["rounds_x_identity"] is None  # identity did not run at seed 1

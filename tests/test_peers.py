"""`efmuon bench peers`: the head-to-head with torch DDP behind tc tbf (benchmarks/peers.py, ddp_peer.py).

The end-to-end smoke run needs root and `ip netns` (it makes network namespaces); it is skipped with the
reason otherwise. Every address it uses exists only inside the namespaces it creates, which are gone after.
Never a timing's value: the smoke figures mean nothing, only that both systems ran and counted bytes.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from efmuon.benchmarks import ddp_peer, peers, run_bench
from efmuon.benchmarks.harness import BENCHES

SKIP = peers.skip_reason()


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.split() and ln.split()[0].startswith(prefix)]


def test_peers_is_registered_with_every_variant():
    assert "peers" in BENCHES
    assert peers.VARIANTS == ["ddp fp32", "ddp fp16", "ddp powersgd-r8", "ddp powersgd-r16",
                              "efmuon default", "efmuon identity"]


def test_param_groups_split_the_blocks_matrices_from_embeddings_and_head():
    # Arrange
    setup = ddp_peer.setup_of({"task": "gpt-char", "world": 2, "task_options": {"d_model": 32, "context": 32}})

    # Act
    hidden, other = ddp_peer.param_groups(setup.model)

    # Assert
    names = {id(p): n for n, p in setup.model.named_parameters()}
    assert sorted(names[id(p)] for p in other) == ["lm_head.weight", "wpe.weight", "wte.weight"]
    assert all(names[id(p)].startswith("blocks.") and p.ndim == 2 for p in hidden) and len(hidden) == 8


def test_ratios_pick_the_fastest_ddp_variant_and_compare_efmuon_default_to_it():
    # Arrange
    rows = [{"setting": "s", "variant": "ddp fp32", "time_to_target_s": 10.0, "wire_MB_per_worker": 100.0},
            {"setting": "s", "variant": "ddp fp16", "time_to_target_s": 8.0, "wire_MB_per_worker": 50.0},
            {"setting": "s", "variant": "ddp powersgd-r8", "time_to_target_s": None, "wire_MB_per_worker": 5.0},
            {"setting": "s", "variant": "efmuon default", "time_to_target_s": 4.0, "wire_MB_per_worker": 10.0}]

    # Act
    r = peers.ratios(rows, [("s", "link")])["s"]

    # Assert
    assert r["best_ddp"] == "ddp fp16" and r["time_x"] == 0.5 and r["bytes_x"] == 0.2
    assert r["least_bytes_ddp"] == "ddp fp16"  # a variant that never reached the target is not compared


@pytest.mark.skipif(SKIP is None, reason="root and ip netns are here: the smoke run below probes it too")
def test_batched_powersgd_probe_reports_the_failure_on_this_torch():
    # Act: its own process (it starts a gloo process group of one)
    p = subprocess.run(peers.DDP_ENTRY + ["probe"], capture_output=True, text=True, timeout=120)

    # Assert
    assert p.returncode == 0, p.stderr[-2000:]
    err = json.loads(p.stdout.strip().splitlines()[-1])["batched_powerSGD_hook_error"]
    if torch.__version__.startswith("2.13"):
        assert "AssertionError" in err and "_orthogonalize" in err and "batched_powerSGD_hook" in err


@pytest.mark.skipif(SKIP is None, reason="root and ip netns are here: the bench runs (test below)")
def test_peers_skips_cleanly_without_root(tmp_path):
    # Act
    out = run_bench("peers", True, str(tmp_path / "p.json"), None, "efmuon bench peers --quick", smoke=True)

    # Assert
    assert out["skipped"] == SKIP and out["goals"] == [] and "skipped" in out["table"]


@pytest.mark.slow
@pytest.mark.skipif(SKIP is not None, reason=f"efmuon bench peers: {SKIP}")
def test_peers_smoke_runs_both_systems_behind_tbf(tmp_path):
    # Act
    report, md = tmp_path / "peers.json", tmp_path / "BENCHMARKS.md"
    out = run_bench("peers", True, str(report), str(md), "efmuon bench peers --quick", smoke=True)

    # Assert: a row per variant, every run ran to its end and counted bytes
    res = out["result"]
    assert [r["variant"] for r in res["rows"]] == peers.level_setup("smoke")["variants"]
    setup = res["setup"]
    numel = ddp_peer.setup_of({"task": "gpt-char", "world": setup["workers"],
                               "task_options": setup["task_options"]}).numel
    for run in res["runs"]:
        assert run["wire_MB_per_worker"] > 0 and run["steps"] >= setup["eval_every"]
        if run["system"] == "ddp":
            assert run["val_loss"] <= setup["target"] or run["steps"] == setup["max_steps"]
            # every rank must receive the whole reduced gradient of a step (fp32: 4 bytes a parameter, fp16: 2;
            # PowerSGD: its first step, before start_powerSGD_iter, is a plain fp32 allreduce), on top of start-up
            per = {"ddp fp32": run["steps"] * 4, "ddp fp16": run["steps"] * 2}.get(run["variant"], 4)
            assert run["wire_MB_per_worker"] > run["start_MB_per_worker"] + per * numel / 1e6
            assert run["start_MB_per_worker"] > 0
        else:
            sim = res["simulate"][run["variant"]]
            assert run["steps"] == sim["round"] and run["same_as_sim"] is True
            # link-level frames carry at least what efmuon's own TCP-level count says
            assert run["wire_MB_per_worker"] >= run["efmuon_wire_MB"] > run["payload_MB_per_worker"] * 0.99
    fp32 = next(r for r in res["runs"] if r["variant"] == "ddp fp32")
    fp16 = next(r for r in res["runs"] if r["variant"] == "ddp fp16")
    assert fp16["wire_MB_per_worker"] < fp32["wire_MB_per_worker"]  # the fp16 hook halves the gradients' bytes
    err = res["batched_powerSGD_hook_error"]
    if torch.__version__.startswith("2.13"):
        assert "AssertionError" in err and "_orthogonalize" in err and "batched_powerSGD_hook" in err
    text = md.read_text()
    assert "<!-- bench:peers -->" in text and "efmuon bench peers --quick" in text and "efmuon default" in text
    assert json.loads(report.read_text())["bench"] == "peers"
    assert _namespaces(f"efm-{os.getpid()}-") == []

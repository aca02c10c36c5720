"""Sharded servers without processes (docs/design.md §6.3): the cut of the layers into shards, the shards'
ServerStates stepping with global layer indices to the bits of one server, the refusals, and the merge of
the shards' reports."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import make_cfg
from efmuon.common.algorithm import ServerState, WorkerState
from efmuon.common.errors import ConfigError
from efmuon.common.lmo.batching import spectral_groups
from efmuon.common.lmo.norms import matrix_dims
from efmuon.common.model import model_specs, parameters_of
from efmuon.common.shardmerge import merge_reports
from efmuon.common.shards import check_shardable, layer_costs, layer_units, parse_shard, shard_layers


class Mixed(nn.Module):
    """Hidden matrices of several shapes (some tiny enough to be padded into one Newton-Schulz batch), an
    embedding (sign), a head and biases (bias_rms)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 16)
        self.a = nn.Linear(16, 48)
        self.b = nn.Linear(48, 16)
        self.c = nn.Linear(16, 32, bias=False)
        self.d = nn.Linear(32, 16, bias=False)
        self.e = nn.Linear(16, 16)
        self.head = nn.Linear(16, 7)


def mixed(cfg):
    model = Mixed()
    names, params = parameters_of(model)
    return names, params, model_specs(model, cfg)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_layer_is_in_exactly_one_shard_and_the_cut_is_a_pure_function(n):
    _, _, specs = mixed(make_cfg())

    # Execute
    cut = shard_layers(specs, n)

    # Assert
    assert cut == shard_layers(list(specs), n)  # the same on every process
    assert len(cut) == n and all(cut)
    assert sorted(i for s in cut for i in s) == list(range(len(specs)))
    assert all(s == sorted(s) for s in cut)
    # matrices padded into one Newton-Schulz batch stay together
    spectral = [i for i, s in enumerate(specs) if s.norm == "spectral"]
    owner = {i: k for k, s in enumerate(cut) for i in s}
    for g in spectral_groups([matrix_dims(specs[i].shape) for i in spectral]):
        if g.padded:
            assert len({owner[spectral[j]] for j in g.idx}) == 1


def test_the_cut_is_balanced_by_cost():
    _, _, specs = mixed(make_cfg())
    cost = layer_costs(specs)

    # Execute
    loads = [sum(cost[i] for i in s) for s in shard_layers(specs, 2)]

    # Assert: greedy LPT is within the largest unit (a layer, or a padded batch of them) of a perfect split
    assert max(loads) - min(loads) <= max(sum(cost[i] for i in u) for u in layer_units(specs))


def test_bad_shard_settings_are_refused_with_what_to_do():
    _, _, specs = mixed(make_cfg())
    for text in ("2/2", "1", "a/b", "0/0", "-1/2"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(text)
    assert parse_shard("1/3") == (1, 3)
    with pytest.raises(ConfigError, match="at most"):
        shard_layers(specs, 100)
    with pytest.raises(ConfigError, match="muonmax"):
        check_shardable(make_cfg(preset="muonmax"))
    with pytest.raises(ConfigError, match="cohort"):
        check_shardable(make_cfg(participation=0.5, clients=4))


@pytest.mark.parametrize("preset,method", [("muon", "ef21"), ("gluon", "ef21"), ("scion", "ef14")])
def test_shards_step_their_layers_to_the_bits_of_one_server(preset, method):
    """Two shards' ServerStates (global layer ids) and one whole-model ServerState get the same uplinks:
    every layer of X, W and G and every downlink frame is the same bytes (seeded compressors both ways)."""
    cfg = make_cfg(workers=2, rounds=4, preset=preset, method=method, uplink="randk:0.5", downlink="rankk:2",
                   weight_decay=0.01)
    names, params, specs = mixed(cfg)
    whole = ServerState(params, specs, cfg, 2)
    cut = shard_layers(specs, 2)
    shards = [ServerState([params[i] for i in s], [specs[i] for i in s], cfg, 2, layer_ids=s) for s in cut]
    workers = [WorkerState(params, specs, cfg, j) for j in range(2)]

    for k in range(4):
        grads = {j: [torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + j)) for p in params]
                 for j in range(2)}
        if k == 0:
            ups = {j: workers[j].init_uplink(grads[j]) for j in range(2)}
        else:
            ups = {j: workers[j].make_uplink(grads[j]) for j in range(2)}
        whole.aggregate(ups, init=k == 0)
        for s, st in zip(cut, shards):
            st.aggregate({j: [f[i] for i in s] for j, f in ups.items()}, init=k == 0)
        frames = whole.step()
        parts = [st.step() for st in shards]
        for s, st, fr in zip(cut, shards, parts):
            for local, i in enumerate(s):
                assert fr[local] == frames[i], (k, names[i])
                assert torch.equal(st.X[local], whole.X[i]) and torch.equal(st.W[local], whole.W[i])
                assert torch.equal(st.G[local], whole.G[i])
        for w in workers:
            w.apply_downlink(frames)


def test_a_shard_refuses_muonmax_in_its_state():
    cfg = make_cfg(preset="muonmax")
    _, params, specs = mixed(cfg)
    with pytest.raises(ConfigError, match="muonmax"):
        ServerState(params[:2], specs[:2], cfg, 2, layer_ids=[0, 1])


def _shard_report(index, count, up, down, seconds):
    b = {"up": {"payload": up, "message": up + 10, "wire": up + 20},
         "down": {"payload": down, "message": down + 10, "wire": None}}
    return {"config": {"task": "lsq", "report": f"s{index}.json"},
            "rounds": [{"round": 1, "loss_w": None, "loss_x": None, "seconds": seconds, "bytes": b, "train_loss": 1.5,
                        "clients": {"0": b}}],
            "summary": {"rounds": 1, "bytes": b, "uncompressed_bytes": {"up": 4 * up, "down": 4 * down},
                        "parameters": up, "seconds": seconds, "w_sha256": f"layers{index}",
                        "shard": {"index": index, "count": count, "layers": [index], "names": [f"p{index}"],
                                  "w_sha256": f"layers{index}", "x_sha256": "x", "layers_file": None}}}


def test_merged_report_sums_bytes_keeps_each_shard_and_takes_the_slowest_round():
    a, b = _shard_report(0, 2, 100, 50, 0.5), _shard_report(1, 2, 30, 20, 0.75)

    # Execute (any order)
    merged = merge_reports([b, a], evaluate=False)

    # Assert
    s, r = merged["summary"], merged["rounds"][0]
    assert s["bytes"]["up"] == {"payload": 130, "message": 150, "wire": 170}
    assert s["bytes"]["down"]["wire"] is None and s["bytes"]["down"]["payload"] == 70
    assert s["uncompressed_bytes"] == {"up": 520, "down": 280} and s["parameters"] == 130
    assert [x["index"] for x in s["shards"]] == [0, 1] and s["shards"][1]["bytes"]["up"]["payload"] == 30
    assert r["seconds"] == 0.75 and r["shard_seconds"] == [0.5, 0.75] and r["train_loss"] == 1.5
    assert r["clients"]["0"]["up"]["payload"] == 130
    assert s["w_sha256"] is None  # no layer files: the whole model's hash is unknown, not a shard's


def test_merge_refuses_reports_that_are_not_one_runs_shards():
    a, b = _shard_report(0, 2, 100, 50, 0.5), _shard_report(1, 2, 30, 20, 0.75)
    with pytest.raises(ConfigError, match="every\\s+shard"):
        merge_reports([a], evaluate=False)
    with pytest.raises(ConfigError, match="every"):
        merge_reports([a, a], evaluate=False)
    plain = {"config": {}, "rounds": [], "summary": {"rounds": 0}}
    with pytest.raises(ConfigError, match="not the report of a shard"):
        merge_reports([plain, b], evaluate=False)
    other = _shard_report(1, 2, 30, 20, 0.75)
    other["config"]["task"] = "digits"
    with pytest.raises(ConfigError, match="another run configuration"):
        merge_reports([a, other], evaluate=False)


@pytest.mark.slow
def test_cli_refuses_shards_with_muonmax_or_cohorts_before_starting():
    cli = [sys.executable, "-m", "efmuon.cli"]
    out = subprocess.run(cli + ["server", "--shard", "0/2", "--task", "lsq", "--preset", "muonmax", "--port", "0",
                                "--host", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "muonmax" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(cli + ["run", "--shards", "2", "--task", "lsq", "--clients", "8", "--participation", "0.5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "cohort" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(cli + ["server", "--shard", "3/2", "--task", "lsq", "--host", "127.0.0.1", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--shard '3/2'" in out.stderr

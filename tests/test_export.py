"""The trained model as safetensors: `efmuon run --save-model` and `efmuon export CKPT OUT` write W keyed by the
model's parameter names, which loads with the `safetensors` package alone into the task's model (strict) and is the
run's model: it hashes to the report's w_sha256 and evaluates to the report's loss at W. Existing outputs and
checkpoints that are not a server's are refused."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch
from conftest import Harness, make_cfg, run_workers
from efmuon.common.algorithm import params_sha256
from efmuon.common.config import RunConfig, from_mapping
from efmuon.common.errors import ConfigError
from efmuon.common.export import check_output, read_model, save_model
from efmuon.common.model import Setup
from efmuon.server.errors import RunAborted
from efmuon.server.options import ServerOptions
from safetensors.torch import load_file

FLAGS = ["--task", "lsq", "--workers", "2", "--rounds", "3", "--uplink", "topk:0.5", "--downlink", "natural"]


def efmuon(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efmuon.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `efmuon run --save-model` with checkpoints: (directory, report)."""
    d = tmp_path_factory.mktemp("export")
    p = efmuon("run", *FLAGS, "--save-model", str(d / "model.safetensors"), "--checkpoint-dir", str(d / "ckpt"),
               "--report", str(d / "report.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"saved W to {d / 'model.safetensors'}" in p.stdout
    return d, json.loads((d / "report.json").read_text())


def loaded_model(path):
    """The task's model built from the file's own metadata, with the file loaded by safetensors (strict)."""
    _, meta = read_model(path)
    setup = Setup(from_mapping(json.loads(meta["config"]), RunConfig(), where=str(path)))
    setup.model.load_state_dict(load_file(str(path)), strict=True)
    return setup, meta


@pytest.mark.slow
def test_save_model_loads_into_the_tasks_model_and_is_the_runs_w(run):
    # Prepare
    d, report = run
    summary = report["summary"]

    # Execute
    setup, meta = loaded_model(d / "model.safetensors")
    names, params = zip(*setup.model.named_parameters())
    setup.model.eval()
    with torch.no_grad():
        loss = float(setup.task.train_eval_loss(setup.model))

    # Assert
    assert params_sha256(params, names) == summary["w_sha256"]
    assert loss == pytest.approx(summary["final_loss_w"], rel=1e-6, abs=1e-9)
    assert meta["tensors"] == "W" and meta["task"] == "lsq" and meta["round"] == "3"
    assert meta["w_sha256"] == meta["sha256"] == summary["w_sha256"] and meta["x_sha256"] == summary["x_sha256"]
    assert json.loads(meta["config"])["rounds"] == 3 and json.loads(meta["config"])["uplink"] == "topk:0.5"


def test_export_of_the_final_checkpoint_equals_save_model_and_x_is_the_runs_x(run, tmp_path):
    # Prepare
    d, report = run

    # Execute
    pw = efmuon("export", str(d / "ckpt"), str(tmp_path / "w.safetensors"))
    px = efmuon("export", str(d / "ckpt"), str(tmp_path / "x.safetensors"), "--which", "x")

    # Assert
    assert pw.returncode == 0 and px.returncode == 0, pw.stderr + px.stderr
    w, saved = load_file(str(tmp_path / "w.safetensors")), load_file(str(d / "model.safetensors"))
    assert w.keys() == saved.keys() and all(torch.equal(w[k], saved[k]) for k in w)
    setup, meta = loaded_model(tmp_path / "x.safetensors")
    names, params = zip(*setup.model.named_parameters())
    assert params_sha256(params, names) == report["summary"]["x_sha256"] == meta["sha256"]
    assert meta["tensors"] == "X" and meta["w_sha256"] == report["summary"]["w_sha256"]


def test_export_refuses_an_existing_output_unless_force(run, tmp_path):
    # Prepare
    d, _ = run
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")

    # Execute
    refused = efmuon("export", str(d / "ckpt"), str(out))
    kept = out.read_bytes()
    forced = efmuon("export", str(d / "ckpt"), str(out), "--force")

    # Assert
    assert refused.returncode == 2 and "already exists" in refused.stderr and "--force" in refused.stderr
    assert kept == b"keep me"
    assert forced.returncode == 0, forced.stderr
    assert read_model(out)[1]["tensors"] == "W"


def test_export_refuses_a_worker_checkpoint_and_a_folder_without_checkpoints(run, tmp_path):
    # Prepare: a worker checkpoint (the local workers of `efmuon run` keep theirs under DIR/worker-J)
    d, _ = run
    worker_dir = d / "ckpt" / "worker-0"
    assert worker_dir.is_dir()

    # Execute
    worker = efmuon("export", str(worker_dir), str(tmp_path / "a.safetensors"))
    empty = efmuon("export", str(tmp_path), str(tmp_path / "b.safetensors"))

    # Assert
    assert worker.returncode == 2 and "not a server checkpoint" in worker.stderr, worker.stderr
    assert empty.returncode == 2 and "no checkpoint here" in empty.stderr, empty.stderr
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


def test_run_refuses_an_existing_save_model_path_before_training(tmp_path):
    # Prepare
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier model")

    # Execute
    p = efmuon("run", *FLAGS, "--save-model", str(out), "--report", str(tmp_path / "r.json"))

    # Assert
    assert p.returncode == 2 and f"{out} already exists" in p.stderr, p.stderr
    assert "--force" not in p.stderr  # `efmuon run` has no such flag: do not suggest one
    assert out.read_bytes() == b"an earlier model" and not (tmp_path / "r.json").exists()


def test_save_model_read_model_round_trip_and_refusals(tmp_path):
    # Prepare
    names = ["b.weight", "a.bias"]
    W, X = [torch.randn(3, 4), torch.randn(4)], [torch.randn(3, 4), torch.randn(4)]

    # Execute
    meta = save_model(tmp_path / "m.safetensors", names, W, X, cfg={"task": "lsq"}, round_=7, which="x")
    tensors, read = read_model(tmp_path / "m.safetensors")

    # Assert
    assert read == meta and read["round"] == "7" and read["sha256"] == params_sha256(X, names)
    assert all(torch.equal(tensors[n], x) for n, x in zip(names, X))
    assert not [p.name for p in tmp_path.iterdir() if p.name != "m.safetensors"]  # no temporary file left
    with pytest.raises(ConfigError, match="already exists"):
        save_model(tmp_path / "m.safetensors", names, W)
    with pytest.raises(ConfigError, match="not unique"):
        save_model(tmp_path / "n.safetensors", ["a", "a"], W)
    with pytest.raises(ConfigError, match="names for"):
        save_model(tmp_path / "n.safetensors", ["a"], W)
    with pytest.raises(ConfigError, match="does not exist"):
        check_output(tmp_path / "missing" / "m.safetensors")
    with pytest.raises(ConfigError, match="is a directory"):
        check_output(tmp_path)


async def test_coordinator_saves_w_at_the_end_and_a_failed_save_fails_the_run_but_keeps_the_report(tmp_path):
    # Prepare: two runs of the service harness; the second one's path exists already (the CLI refuses that
    # before training; here it stands for a file that appeared during the run)
    cfg = make_cfg(workers=2, rounds=2)
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"someone else's")
    results = []
    for path in (tmp_path / "w.safetensors", taken):
        # Execute
        async with Harness(cfg, options=ServerOptions(save_model=str(path))) as h:
            await run_workers(h.worker(0), h.worker(1))
            await asyncio.wait_for(h.coordinator.finished.wait(), 30)
        results.append(h.coordinator)

    # Assert
    ok, failed = results
    tensors, meta = read_model(tmp_path / "w.safetensors")
    assert ok.failed is None and meta["w_sha256"] == ok.report.summary["w_sha256"] == meta["sha256"]
    assert params_sha256(list(tensors.values()), list(tensors)) == ok.report.summary["w_sha256"]
    assert sorted(tensors) == sorted(ok.model.names) and meta["round"] == str(ok.state.round)
    assert isinstance(failed.failed, RunAborted) and f"--save-model {taken} failed" in str(failed.failed)
    assert "already exists" in str(failed.failed) and taken.read_bytes() == b"someone else's"
    assert failed.report.summary["w_sha256"]  # the report was written before the model

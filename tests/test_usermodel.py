"""A user's own model (`--model module:factory`, common.usermodel): the README's "Your own model" section run as
written (the module, `efmuon simulate`, `efmuon run`, `efmuon export`, loading the file), its errors, and the
Python API without a hidden resolve step."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from efmuon.cli import main
from efmuon.common.config import RunConfig, from_mapping
from efmuon.common.errors import ConfigError
from efmuon.common.usermodel import UserTask, make_run_task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "examples" / "digits_cnn.py"


def readme_section_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of README.md's "### Your own model" section."""
    text = (ROOT / "README.md").read_text()
    start = text.index("### Your own model\n")
    end = text.index("\n### ", start + 1)
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.S)


def commands_of(bash: str) -> list[list[str]]:
    """The block's commands: continuation lines joined, comments dropped."""
    joined = bash.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def efmuon(args: list[str], cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "efmuon.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_module(tmp_path: Path, name: str, body: str) -> Path:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return tmp_path


@pytest.fixture
def in_dir(tmp_path, monkeypatch):
    """tmp_path as the current folder (the loader searches it), the example module in it; modules imported
    from it are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_cnn.py").write_text(EXAMPLE.read_text())
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        mod = sys.modules.get(name)
        if str(getattr(mod, "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


# ------------------------------------------------------------------ the README, as written


def test_readme_module_is_the_kept_example():
    blocks = readme_section_blocks()
    assert blocks[0][0] == "python"
    assert blocks[0][1] == EXAMPLE.read_text(), "README's digits_cnn.py and tests/examples/digits_cnn.py differ"


@pytest.mark.slow
def test_readme_your_own_model_runs_as_written(tmp_path):
    """The section's module, commands and loading snippet, as written: simulate and the networked run end in
    the same bits, the loss falls, W and X export and load with strict=True into the user's CNN."""
    blocks = readme_section_blocks()
    module, bash, load = blocks[0][1], blocks[1][1], blocks[2][1]
    assert [b[0] for b in blocks[:3]] == ["python", "bash", "python"]
    (tmp_path / "digits_cnn.py").write_text(module)
    commands = commands_of(bash)
    assert [c[:2] for c in commands] == [["efmuon", "simulate"], ["efmuon", "run"], ["efmuon", "export"]]
    assert all("--model" in c for c in commands[:2])
    for cmd in commands:
        res = efmuon(cmd[1:], tmp_path)
        assert res.returncode == 0, f"{shlex.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    sim = json.loads((tmp_path / "sim.json").read_text())
    net = json.loads((tmp_path / "net.json").read_text())
    assert sim["summary"]["w_sha256"] == net["summary"]["w_sha256"]
    for rep in (sim, net):
        assert rep["config"]["model"] == "digits_cnn:make" and rep["config"]["task"] == "digits_cnn:make"
        losses = [r["loss_w"] for r in rep["rounds"] if r.get("loss_w") is not None]
        assert losses[0] > 2.0 and losses[-1] < 0.5 * losses[0], losses
        assert rep["summary"]["eval_loss_w"] < 0.5 * losses[0]
    # the loading snippet, in a fresh interpreter in that folder, then the file's tensors are the run's W
    check = load + textwrap.dedent("""
        import hashlib, torch
        from efmuon.common.algorithm import params_sha256
        names, params = zip(*model.named_parameters())
        print("SHA", params_sha256(list(params), list(names)))
        x = CNN(); x.load_state_dict(safetensors.torch.load_file("cnn-x.safetensors"), strict=True)
        print("XSHA", params_sha256(list(x.parameters()), [n for n, _ in x.named_parameters()]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    out = dict(line.split() for line in res.stdout.splitlines() if line.startswith(("SHA", "XSHA")))
    assert out["SHA"] == net["summary"]["w_sha256"]
    assert out["XSHA"] == net["summary"]["x_sha256"]


def test_readme_python_api_block(in_dir):
    """The section's Python block (a RunConfig with the model; no resolve to call), with fewer rounds."""
    blocks = readme_section_blocks()
    code = [b for lang, b in blocks if lang == "python" and "RunConfig(model=" in b][0]
    code = code.replace("rounds=30", "rounds=3, workers=2")
    ns: dict = {}
    exec(compile(code, "README-your-own-model", "exec"), ns)
    report = ns["report"]
    assert report["config"]["task"] == "digits_cnn:make" and report["config"]["model"] == "digits_cnn:make"
    assert len(report["rounds"]) == 3 and len(report["summary"]["w_sha256"]) == 64


# ------------------------------------------------------------------ reproducible, and like a built-in task


def test_user_task_parameters_are_seeded_and_leave_the_global_rng_alone(in_dir):
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    a = make_run_task(RunConfig(model="digits_cnn:make", seed=1))
    after = torch.rand(3)
    assert torch.equal(after, expect), "building the user's model moved the global RNG"
    b = make_run_task(RunConfig(model="digits_cnn:make", seed=1))
    c = make_run_task(RunConfig(model="digits_cnn:make", seed=2))
    assert isinstance(a, UserTask) and a.name == "digits_cnn:make"
    pa, pb, pc = (list(t.build_model().parameters()) for t in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc))
    m1, m2 = a.build_model(), a.build_model()
    assert m1 is not m2 and next(m1.parameters()).data_ptr() != next(m2.parameters()).data_ptr()
    x, y = a.batch(1, 5)
    assert x.shape == (64, 1, 8, 8) and torch.equal(x, a.batch(1, 5)[0])


def test_config_names_the_model(in_dir):
    cfg = from_mapping({"model": "digits_cnn:make"}, RunConfig(task="digits"))
    assert cfg.task == "digits_cnn:make"  # a model given over a file's task replaces it
    with pytest.raises(ConfigError, match="either task .* or model"):
        from_mapping({"task": "digits", "model": "digits_cnn:make"})
    back = from_mapping({"task": "lsq"}, cfg)
    assert back.model is None and back.task == "lsq"


def test_coordinator_resolves_its_own_config():
    """The low-level recipe: Coordinator(cfg, ServerModel(names, params, specs)) with unset fields."""
    from efmuon.common.model import model_specs, parameters_of
    from efmuon.server.coordinator import Coordinator
    from efmuon.server.model import ServerModel

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    cfg = RunConfig(task="lsq", workers=2, uplink="identity", downlink="identity")
    names, params = parameters_of(model)
    coord = Coordinator(cfg, ServerModel(names, params, model_specs(model, cfg)), quiet=True)
    assert coord.cfg.preset == "muon" and coord.cfg.rounds == 100 and coord.cfg.lr == 0.02


# ------------------------------------------------------------------ clear errors


@pytest.mark.parametrize("spec, expect", [
    ("digits_cnn", "is not module:factory"),
    ("digits_cnn:", "is not module:factory"),
    ("digits-cnn:make", "is not module:factory"),
    ("no_such_module_h3:make", "module 'no_such_module_h3' cannot be imported .*PYTHONPATH.*sys.path"),
    ("digits_cnn:nope", "has no 'nope'; its functions and classes: CNN, .*make"),
])
def test_cli_model_errors(in_dir, capsys, spec, expect):
    assert main(["simulate", "--model", spec, "--rounds", "1", "--plots", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("efmuon simulate: error: ") and re.search(expect, err), err


def test_cli_refuses_task_and_model_together(in_dir, capsys):
    assert main(["simulate", "--task", "digits", "--model", "digits_cnn:make", "--rounds", "1"]) == 2
    assert "give either task ('digits') or model ('digits_cnn:make'), not both" in capsys.readouterr().err


BAD = '''
    import torch
    from efmuon.common.usermodel import UserModel

    def _ok(**kw):
        m = torch.nn.Linear(2, 1)
        return dict(model=m, loss=lambda mm, b: mm(b).sum(), batch=lambda j, k: torch.ones(1, 2) * (j + k))

    def not_a_user_model():
        return torch.nn.Linear(2, 1)

    def wants_lr(lr):
        return UserModel(**_ok())

    def no_options():
        return UserModel(**_ok())

    def random_batches():
        kw = _ok()
        kw["batch"] = lambda j, k: torch.rand(1, 2)
        return UserModel(**kw)

    def vector_loss():
        kw = _ok()
        kw["loss"] = lambda mm, b: mm(b)[0] * torch.ones(3)
        return UserModel(**kw)

    def half():
        kw = _ok()
        kw["model"] = kw["model"].double()
        return UserModel(**kw)

    def bad_defaults():
        return UserModel(**_ok(), defaults={"learning_rate": 1})

    def fine(seed, workers, options, config):
        assert workers == 3 and options == {} and config.seed == seed == 5
        return UserModel(**_ok())

    def fails_import_inside():
        import no_such_dependency_h3  # noqa: F401
'''


@pytest.mark.parametrize("attr, expect", [
    ("not_a_user_model", "returned Linear; return efmuon.common.usermodel.UserModel"),
    ("wants_lr", "argument 'lr' is not one efmuon gives; it may take any of seed, workers, options, config"),
    ("random_batches", r"batch\(0, 0\) returned different data on two calls"),
    ("vector_loss", "must return a scalar floating-point tensor"),
    ("half", "not float32: weight \\(torch.float64\\)"),
    ("bad_defaults", r"unknown key\(s\) \['learning_rate'\]"),
])
def test_factory_shape_errors(in_dir, attr, expect):
    write_module(in_dir, "bad_models_h3", BAD)
    cfg = RunConfig(model=f"bad_models_h3:{attr}", workers=2, rounds=1, uplink="identity", downlink="identity")
    from efmuon.simulate import simulate

    with pytest.raises(ConfigError, match=expect):
        simulate(cfg, quiet=True)


def test_factory_arguments_and_options(in_dir):
    write_module(in_dir, "bad_models_h3", BAD)
    task = make_run_task(RunConfig(model="bad_models_h3:fine", workers=3, seed=5))
    assert task.n_workers == 3
    with pytest.raises(ConfigError, match="task options \\['x'\\] were given but the factory takes no 'options'"):
        make_run_task(RunConfig(model="bad_models_h3:no_options", task_options={"x": 1}))


def test_a_module_whose_own_import_fails_is_not_called_missing(in_dir):
    write_module(in_dir, "bad_models_h3", BAD + "\n    import no_such_dependency_h3\n")
    with pytest.raises(ConfigError, match="importing module 'bad_models_h3' failed: No module named "
                                          "'no_such_dependency_h3'"):
        make_run_task(RunConfig(model="bad_models_h3:fine"))


def test_worker_without_the_module_says_so(tmp_path):
    """A worker whose machine lacks the module: the task is built from the server's config and fails
    naming the module and the sys.path hint (here in-process: `task_setup` as `efmuon worker` calls it)."""
    from efmuon.common.federation import task_setup
    from efmuon.common.wire import protocol

    cfg = from_mapping({"model": "digits_cnn_absent_h3:make", "rounds": 2})
    got = protocol.decode_config(protocol.encode_config(cfg))  # what the worker receives
    assert got.model == "digits_cnn_absent_h3:make"
    with pytest.raises(ConfigError, match="module 'digits_cnn_absent_h3' cannot be imported in this process.*"
                                          "importable on the server and on every worker"):
        task_setup(got)

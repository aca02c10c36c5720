"""The command line as a newcomer meets it: `--version`, usage without a command, every default in
`--help`, help that loads neither torch nor grpc, and the resolved configuration on request."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from efmuon.cli import build_parser, main

from conftest import CLI



def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk of its subcommands
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def test_every_option_of_every_command_states_its_default():
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:  # noqa: SLF001
            if not action.option_strings or action.required or isinstance(
                    action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._VersionAction,  # noqa: SLF001
                             argparse._AppendAction)):  # noqa: SLF001 - repeatable: the default is none
                continue
            if "default" not in (action.help or ""):
                missing.append(f"efmuon {name} {action.option_strings[0]}")
    assert not missing, "options whose --help does not say their default:\n" + "\n".join(missing)


def test_version_and_no_command_print_usage_instead_of_starting_a_run(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("efmuon ")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: efmuon" in err and "efmuon run" in err


def test_help_loads_neither_torch_nor_grpc():
    code = ("import sys; from efmuon.cli import main\n"
            "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'torch' in sys.modules, 'grpc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED False False" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]


def test_print_config_shows_the_resolved_configuration_and_every_parameter(capsys):
    assert main(["simulate", "--task", "lsq", "--uplink", "topk:0.1", "--print-config"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads(out[out.index("{"):out.index("\n}\n") + 2])
    assert cfg["task"] == "lsq" and cfg["uplink"] == "topk:0.1" and cfg["rounds"] and cfg["preset"] == "muon"
    assert "parameters (name, shape, norm, uplink, downlink)" in out
    assert "topk:0.1" in out.split("parameters")[1]


@pytest.mark.slow
def test_run_leaves_its_report_and_plots_in_a_run_directory_and_speaks_at_once(tmp_path):
    out = subprocess.run(CLI + ["run", "--task", "lsq", "--workers", "2", "--rounds", "3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    assert first.startswith("efmuon run: task lsq, 2 workers, 3 rounds; starting") and "runs/" in first
    reports = list((tmp_path / "runs").glob("*-lsq/report.json"))
    assert len(reports) == 1
    assert json.loads(reports[0].read_text())["summary"]["rounds"] == 3
    assert list(reports[0].parent.glob("*.png"))  # and its plots beside it


def test_progress_lines_carry_an_eta():
    import io

    from efmuon.common.report import Report, human_seconds

    stream = io.StringIO()
    rep = Report({}, transport=False, log_every=1, total_rounds=10, stream=stream)
    for k in (1, 2):
        rep.add_round(k, 1.0, 1.0, 0.1, {"up": {"payload": 10}, "down": {"payload": 10}})
    rep.add_round(10, 1.0, 1.0, 0.1, {"up": {"payload": 10}, "down": {"payload": 10}})
    lines = stream.getvalue().splitlines()
    assert all(" ETA " in line for line in lines[:2]) and " ETA " not in lines[2]  # none after the last round
    assert [human_seconds(s) for s in (5, 65, 7260)] == ["5s", "1m05s", "2h01m"]

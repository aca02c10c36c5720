"""The command line as a newcomer meets it: `--version`, usage without a command, every default in
`--help`, help that loads neither torch nor grpc, and the resolved configuration on request."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from efmuon.cli import build_parser, main

CLI = [sys.executable, "-m", "efmuon.cli"]


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

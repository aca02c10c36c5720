"""`EFMUON_*` environment equivalents of a command's flags (`efmuon worker`), for orchestrators (Slurm,
Kubernetes, torchrun) that configure a process by its environment rather than its command line.

Every flag --some-flag has the variable EFMUON_SOME_FLAG (upper-cased, '-' -> '_'). A flag given on the
command line wins over its variable (also over the variable of a flag it excludes: --clients on the command
line ignores EFMUON_CLIENT_ID); an empty variable counts as unset; a boolean flag takes 1/true/yes/on or
0/false/no/off; a value the flag would refuse is a ConfigError naming the variable.

How: `track(parser)` (after its flags are added) makes every option's default an `Unset` marker, so that
after parsing an option still holding its marker was not on the command line; `resolve(args)` then takes
the variable or the real default. A flag marked required becomes optional here, and `resolve` names the
flag and its variable when neither is given.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from ..common.errors import ConfigError

PREFIX = "EFMUON_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_name(flag: str) -> str:
    """--client-id -> EFMUON_CLIENT_ID."""
    return PREFIX + flag.lstrip("-").upper().replace("-", "_")


class Unset:
    """The default of an option not given on the command line (argparse leaves it in the namespace)."""

    def __init__(self, action: argparse.Action, default, required: bool, excludes: tuple[str, ...]):
        self.action, self.default, self.required, self.excludes = action, default, required, excludes

    def __repr__(self) -> str:
        return repr(self.default)

    def __str__(self) -> str:  # --help's %(default)s
        return str(self.default)


def _long_flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def track(parser: argparse.ArgumentParser) -> list[str]:
    """Give every option of `parser` its EFMUON_* variable; returns the variables' names in order."""
    excludes: dict[str, set[str]] = {}
    for group in parser._mutually_exclusive_groups:  # noqa: SLF001 - argparse has no public walk
        dests = {a.dest for a in group._group_actions}  # noqa: SLF001
        for d in dests:
            excludes.setdefault(d, set()).update(dests - {d})
    names = []
    for action in parser._actions:  # noqa: SLF001
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):  # noqa: SLF001
            continue
        if not isinstance(action, (argparse._StoreAction, argparse._StoreTrueAction)):  # noqa: SLF001
            raise TypeError(f"{_long_flag(action)}: only store and store_true flags have EFMUON_* variables")
        action.default = Unset(action, action.default, action.required, tuple(sorted(excludes.get(action.dest, ()))))
        if action.required:
            action.required = False
        names.append(env_name(_long_flag(action)))
    return names


def _from_env(action: argparse.Action, name: str, raw: str):
    text = raw.strip()
    if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
        if text.lower() in TRUE:
            return True
        if text.lower() in FALSE:
            return False
        raise ConfigError(f"{name}={raw!r} is not a boolean: give 1, true, yes or 0, false, no "
                          f"(the flag {_long_flag(action)})")
    value = text
    if action.type is not None:
        try:
            value = action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            kind = getattr(action.type, "__name__", "value")
            raise ConfigError(f"{name}={raw!r} is not a valid {kind} for {_long_flag(action)} ({exc})") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(map(str, action.choices))} "
                          f"(the flag {_long_flag(action)})")
    return value


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Replace each option not given on the command line by its EFMUON_* variable, else its default."""
    env = os.environ if environ is None else environ
    marks = {dest: v for dest, v in vars(args).items() if isinstance(v, Unset)}
    given = {dest for dest in vars(args) if dest not in marks}
    from_env: dict[str, str] = {}
    for dest, mark in marks.items():
        name = env_name(_long_flag(mark.action))
        raw = env.get(name, "")
        value = mark.default
        if raw.strip() and not (set(mark.excludes) & given):
            value = _from_env(mark.action, name, raw)
            if value is not False:
                from_env[dest] = name
        elif mark.required:
            raise ConfigError(f"{_long_flag(mark.action)} is required: give it, or set {name}")
        setattr(args, dest, value)
    for dest, name in from_env.items():
        for other in marks[dest].excludes:
            if other in from_env and dest < other:
                raise ConfigError(f"{name} and {from_env[other]} are both set: the flags "
                                  f"{_long_flag(marks[dest].action)} and {_long_flag(marks[other].action)} "
                                  "exclude each other; unset one")
    return args


def epilog(names: list[str]) -> str:
    """The --help text that lists the variables."""
    return ("environment: every flag also reads a variable, the flag upper-cased with '-' -> '_' and prefixed "
            "EFMUON_ (" + ", ".join(names) + "); a flag on the command line wins over its variable, an empty "
            "variable counts as unset, booleans take 1/true/yes or 0/false/no. Under torchrun (WORLD_SIZE > 1) "
            "the ranks form one client: a worker group (rank 0 talks to the server; README 'Across machines').")

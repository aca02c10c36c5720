"""Task options: the checkers of one option's value (integer, number in a range, one of named choices, boolean) and the
resolution of the given options against a task's table of (default, checker), naming the valid
options when one is unknown."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError


def _int_opt(minimum: int, allow_none: bool = False) -> Callable[[str, Any], int | None]:
    def check(key: str, value: Any) -> int | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"task option {key}={value!r} must be an integer >= {minimum}")
        if value < minimum:
            raise ConfigError(f"task option {key}={value!r} must be an integer >= {minimum}")
        return int(value)
    return check


def _float_opt(minimum: float, *, strict: bool = False, maximum: float | None = None,
               allow_none: bool = False) -> Callable[[str, Any], float | None]:
    def check(key: str, value: Any) -> float | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ConfigError(f"task option {key}={value!r} must be a number")
        value = float(value)
        bad = (not math.isfinite(value) or value < minimum or (strict and value == minimum)
               or (maximum is not None and value >= maximum))
        if bad:
            rng = f"{'>' if strict else '>='} {minimum}" + (f" and < {maximum}" if maximum else "")
            raise ConfigError(f"task option {key}={value!r} must be a finite number {rng}")
        return value
    return check


def _choice_opt(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"task option {key}={value!r} must be one of {list(choices)}")
        return value
    return check


def _bool_opt(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"task option {key}={value!r} must be true or false")
    return value


def _resolve_options(task: str, spec: dict[str, tuple[Any, Callable]], given: dict) -> dict:
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for task {task!r}; "
                          f"valid options: {sorted(spec)}")
    out = {}
    for key, (default, check) in spec.items():
        out[key] = check(key, given[key]) if key in given else default
    return out


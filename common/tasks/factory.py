"""`make_task`: a task by name, its options checked against the task's table (`TASKS` names them)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import Task
from .digits import DigitsTask
from .gpt import GptTask
from .gptchar import GptCharTask
from .gptmoe import GptMoeTask
from .lsq import LsqTask
from .options import _resolve_options

TASKS = ("lsq", "digits", "gpt-char", "gpt", "gpt-moe")

_CLASSES: dict[str, type[Task]] = {"lsq": LsqTask, "digits": DigitsTask, "gpt-char": GptCharTask,
                                   "gpt": GptTask, "gpt-moe": GptMoeTask}


def make_task(name: str, n_workers: int, seed: int = 0, **options: Any) -> Task:
    """Build a task. Unknown names or options raise ``ConfigError`` listing the valid ones."""
    if name not in _CLASSES:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {list(TASKS)}")
    if isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer)) or n_workers < 1:
        raise ConfigError(f"n_workers={n_workers!r} must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed={seed!r} must be an integer")
    cls = _CLASSES[name]
    resolved = _resolve_options(name, cls.OPTIONS, options)
    return cls(int(n_workers), int(seed), resolved)

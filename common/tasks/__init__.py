"""Built-in training tasks that need no download: ``lsq``, ``digits``, ``gpt-char``, ``gpt``
(byte-level, sizes small / 10m / 124m) and ``gpt-moe``.

A task owns the data, the split into ``n_workers`` shards (worker j's local objective f_j), the
model and the losses. Everything is a pure function of ``(name, n_workers, seed, options)``:

* the data, the shards and the initial weights are identical in every process;
* ``batch(worker, round)`` is identical in every process and for every call order — its random
  stream is a ``torch.Generator`` seeded by a SHA-256 hash of ``(task, seed, worker, round)``;
* no function here reads or advances the global torch / numpy / ``random`` RNG state
  (models are built under a forked RNG and initialised from a local generator).

The training objective is f = (1/n) sum_j f_j. ``train_eval_loss`` evaluates it (exactly for
``lsq`` and ``digits``; on a fixed set of training windows, equally many per worker, for
``gpt-char``). ``eval_loss`` is a held-out loss (``lsq`` has no held-out data: it is f again).

``Task.defaults`` are the recommended run settings, tuned with a reference implementation of the
Muon-preset LMO step (see tests/test_tasks.py). Schedule convention used in that tuning, for round
k = 0 .. rounds-1::

    k <  warmup:  lr_k = lr * (k + 1) / warmup
    k >= warmup:  p = (k - warmup) / (rounds - warmup)
                  constant: lr;  linear: lr * (1 - p);  cosine: lr * (1 + cos(pi p)) / 2

Modules: ``base`` (seeds, the `Task` interface), ``options`` (option checkers), ``lsq``,
``digits``, ``gptchar`` (the task and its GPT model), ``gpt`` (the byte-level
GPT in three sizes), ``gptmoe`` (gpt-char's data, an MLA + MoE GPT), ``factory`` (`make_task`, `TASKS`).
"""

from __future__ import annotations

from .base import Task, derive_seed
from .digits import DigitsMLP, DigitsTask
from .factory import TASKS, make_task
from .gpt import SIZES as GPT_SIZES, GptTask
from .gptchar import GPT, GptCharTask, load_corpus
from .gptmoe import GptMoeTask, MoEGPT
from .lsq import LsqTask

__all__ = ["TASKS", "Task", "LsqTask", "DigitsTask", "GptCharTask", "GptTask", "GPT_SIZES", "make_task", "derive_seed",
           "load_corpus", "DigitsMLP", "GPT", "GptMoeTask", "MoEGPT"]

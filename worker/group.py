"""A worker that is a torch.distributed group: `torchrun --nproc-per-node K -m efmuon.worker --server HOST:PORT`.

When torchrun (or Slurm's srun with torchrun's variables) starts the worker with WORLD_SIZE K > 1, the K
ranks (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) form ONE EF21 client with a K-way split
batch:

* rank 0 alone talks to the server (Status, Join, Exchange, Leave) and holds the client's EF21 state
  (`WorkerState`: M_j, G_j, W); ranks > 0 never open a gRPC channel;
* before every gradient rank 0 broadcasts a command (round k, client j) and the W it holds (after its last
  downlink, catch-up or re-sync), so every rank computes at the same W;
* the client's batch of round k is the one a single worker takes (the built-in task: `task.batch(j, k)`
  with the run's batch size B); rank r takes its rows `torch.tensor_split(batch, K)[r]` (the first
  B mod K ranks one row more), and the gradients and the loss are all-reduced as the mean weighted by
  the rows each rank took (the plain mean when K divides B). For a loss that is a mean over rows
  (gpt-char's cross-entropy: every row has `context` tokens) this is the gradient of the whole batch,
  so a group of K ranks is the same client as one worker with that batch, up to float rounding; to give
  every rank b rows, run the server with batch size K*b (gpt-char: `--task-option batch_size=...`);
* the uplink, the downlink and every byte on the wire are one client's: a group costs the server what
  one worker costs.

Collectives: `init_process_group("cpu:gloo,cuda:nccl")` where torch sees CUDA and --device is not cpu
(the W broadcast and the gradient all-reduce of CUDA tensors then run on NCCL, rank r on cuda:LOCAL_RANK),
else "gloo"; the commands are small pickled objects on the CPU (gloo) side. A rank that fails stops the group: an exception
while computing is gathered and every rank raises `GroupError` naming the rank and its error (rank 0
then leaves the run saying why); rank 0 failing (a refused Join, a lost server) broadcasts the reason
to the others, which exit naming it; a rank that dies outright closes its sockets, the collectives
of the others fail, and torchrun stops the rest.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..common.errors import ConfigError
from ..common.wire import protocol
from .connection import WorkerError

log = logging.getLogger("efmuon.worker")

GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_GROUP_TIMEOUT_S = 86400.0  # how long a rank waits in one collective (rank 0 may wait for rounds)


class GroupError(WorkerError):
    """A rank of the worker group failed; the message names it and why."""


def _env_int(environ: Mapping[str, str], name: str, default: int | None, minimum: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        if default is None:
            raise ConfigError(f"{name} is not set: a worker group (WORLD_SIZE > 1) needs torchrun's RANK, "
                              "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (start it with torchrun)")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number (torchrun sets it; check the launcher)") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be >= {minimum}")
    return value


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """WORLD_SIZE of this process (1 when unset): > 1 makes `efmuon worker` a worker group."""
    return _env_int(os.environ if environ is None else environ, "WORLD_SIZE", 1, 1)


def group_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's variables; a ConfigError names one that is wrong."""
    env = os.environ if environ is None else environ
    world = world_size(env)
    rank = _env_int(env, "RANK", None, 0)
    local = _env_int(env, "LOCAL_RANK", rank, 0)
    if rank >= world:
        raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={world}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name, "").strip():
            raise ConfigError(f"{name} is not set: the ranks of a worker group meet there (torchrun sets it)")
    return rank, local, world


def split_batch(batch: Any, rank: int, world: int) -> tuple[Any, int, int]:
    """(rank's part of `batch`, its rows, the batch's rows): tensors, and tuples, lists and dicts of them,
    are cut along dim 0 with `torch.tensor_split` (every tensor has the same number of rows)."""
    import torch

    rows: list[int] = []

    def cut(x):
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                raise GroupError("the batch holds a 0-d tensor: a worker group splits batches along dim 0")
            rows.append(int(x.shape[0]))
            return torch.tensor_split(x, world, dim=0)[rank]
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v) for v in x)
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        raise GroupError(f"a worker group cannot split a batch holding {type(x).__name__}: give tensors, or "
                         "tuples, lists or dicts of them, with the rows along dim 0")

    part = cut(batch)
    if not rows or len(set(rows)) != 1:
        raise GroupError(f"the batch's tensors have different numbers of rows ({sorted(set(rows))}): a worker "
                         "group splits them along dim 0")
    if rows[0] < world:
        raise GroupError(f"the batch has {rows[0]} rows, fewer than the group's {world} ranks: give the run a "
                         f"batch of at least {world} rows (gpt-char: --task-option batch_size=N)")
    n = rows[0]
    return part, _rows(n, rank, world), n


def _rows(n: int, rank: int, world: int) -> int:
    """The rows `torch.tensor_split(n rows, world)` gives rank `rank`."""
    return n // world + (1 if rank < n % world else 0)


class Group:
    """This process's place in the worker group, and the collectives both sides of it run."""

    def __init__(self, rank: int, local_rank: int, world: int, timeout_s: float = DEFAULT_GROUP_TIMEOUT_S):
        self.rank, self.local_rank, self.world = rank, local_rank, world
        self.timeout_s = float(timeout_s)
        self.device = None
        self._dist = None
        self.broken = False  # a collective failed: no more messages to the others

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_GROUP_TIMEOUT_S) -> Group | None:
        """The group of torchrun's variables, or None when WORLD_SIZE is 1 (a plain worker)."""
        if world_size() <= 1:
            return None
        return cls(*group_ranks(), timeout_s=timeout_s)

    # ------------------------------------------------------------------ setting up
    def start(self, device: str | None) -> None:
        """Join the process group: gloo for the CPU, NCCL as well where CUDA is there and `device` (the
        --device asked for; None: the run's, known later) is not cpu; rank r then uses cuda:LOCAL_RANK."""
        import torch
        import torch.distributed as dist

        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=self.timeout_s))
        self._dist = dist
        log.info("worker group: rank %d of %d (local rank %d), backend %s", self.rank, self.world,
                 self.local_rank, backend)

    def close(self) -> None:
        if self._dist is not None and self._dist.is_initialized():
            try:
                self._dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - ending anyway
                pass

    # ------------------------------------------------------------------ commands (rank 0 -> others)
    def send(self, message: dict) -> None:
        """Rank 0: broadcast a command to the other ranks."""
        self._collective(lambda: self._dist.broadcast_object_list([message], src=0))

    def receive(self) -> dict:
        """Ranks > 0: the next command of rank 0."""
        box = [None]
        self._collective(lambda: self._dist.broadcast_object_list(box, src=0))
        return box[0]

    def abort(self, reason: str) -> None:
        """Rank 0: tell the others the group stops (`reason`), unless the group is already broken."""
        if self.broken or self._dist is None:
            return
        try:
            self.send({"op": "abort", "error": reason})
        except Exception:  # noqa: BLE001 - a rank is gone already; torchrun stops the rest
            pass

    def _collective(self, fn: Callable[[], Any]):
        try:
            return fn()
        except GroupError:
            raise
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL errors: a rank died or timed out
            self.broken = True
            raise GroupError(f"worker group rank {self.rank}: a collective failed (another rank died or hung "
                             f"for {self.timeout_s:g} s?): {type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ W and the gradients
    def broadcast_params(self, params: Sequence) -> None:
        """Every rank's `params` (W) become rank 0's, in place."""
        import torch

        def run():
            flats = _by_dtype(params)
            for dtype, idx in flats.items():
                if len(idx) == 1:
                    self._dist.broadcast(params[idx[0]].data, src=0)
                    continue
                flat = torch.cat([params[i].detach().reshape(-1) for i in idx]) if self.rank == 0 else \
                    torch.empty(sum(params[i].numel() for i in idx), dtype=dtype, device=params[idx[0]].device)
                self._dist.broadcast(flat, src=0)
                if self.rank != 0:
                    at = 0
                    with torch.no_grad():
                        for i in idx:
                            n = params[i].numel()
                            params[i].copy_(flat[at:at + n].view_as(params[i]))
                            at += n

        self._collective(run)

    def gradients(self, model, loss_fn: Callable[[Any, Any], Any], batch: Any, params: Sequence,
                  round_: int) -> tuple[float, list]:
        """This rank's gradient on its part of `batch` at `params`, then the group's weighted mean (every
        rank gets it). An error on any rank is gathered and raised on every rank, naming the rank."""
        import torch

        from ..common.model import gradients  # lazy: torch

        error, loss, grads, weight = None, math.nan, None, 0.0
        try:
            part, rows, total = split_batch(batch, self.rank, self.world)
            weight = rows / total
            loss, grads = gradients(model, params, lambda m: loss_fn(m, part))
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, GroupError) else str(exc)
        errors: list = [None] * self.world
        self._collective(lambda: self._dist.all_gather_object(errors, error))
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:  # every rank knows: the group stops, nobody waits for another message
            self.broken = True
            r, e = failed[0]
            raise GroupError(f"worker group rank {r} failed computing round {round_}: {e}")
        shapes = [g.shape for g in grads]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]
                         + [torch.tensor([loss], dtype=torch.float32, device=grads[0].device)])
        flat.mul_(weight)
        self._collective(lambda: self._dist.all_reduce(flat))
        out, at = [], 0
        for g, shape in zip(grads, shapes):
            n = g.numel()
            out.append(flat[at:at + n].view(shape).to(g.dtype))
            at += n
        return float(flat[-1]), out


def _by_dtype(params: Sequence) -> dict:
    out: dict = {}
    for i, p in enumerate(params):
        out.setdefault(p.dtype, []).append(i)
    return out


# ---------------------------------------------------------------------- rank 0
def lead_gradients(group: Group, worker, round_: int) -> tuple[float, list]:
    """Rank 0's `Worker._gradients`: the command and W to the others, then the group's gradient."""
    group.send({"op": "grad", "round": int(round_), "client": int(worker.client_id)})
    group.broadcast_params(worker.state.W)
    batch = worker._batch(round_)
    worker._bind_model()
    return group.gradients(worker.model, worker.loss_fn, batch, worker.state.W, round_)


def lead(group: Group, worker) -> dict:
    """Rank 0: run the worker (its gradients are the group's); the others are told when it ends."""
    worker.group = group
    try:
        stats = worker.run()
    except BaseException as exc:
        group.abort(f"{type(exc).__name__}: {exc}" if not isinstance(exc, WorkerError) else str(exc))
        raise
    group.send({"op": "done"})
    stats["group"] = {"ranks": group.world}
    return stats


# ---------------------------------------------------------------------- ranks > 0
def follow(group: Group, first: dict | None = None) -> dict:
    """Ranks > 0: build the run's task from the config rank 0 sent (`first`, else the next command), then
    compute each round's part of the gradient at the W rank 0 broadcasts, until rank 0 says done."""
    import torch

    from ..common.federation import task_setup  # lazy: torch (the task)
    from ..common.runtime import configure_torch  # lazy: torch

    msg = first if first is not None else group.receive()
    if msg.get("op") == "abort":
        raise GroupError(f"worker group rank 0 failed: {msg.get('error')}")
    if msg.get("op") != "start":
        raise GroupError(f"worker group: rank 0 sent {msg.get('op')!r} before the run's configuration")
    cfg = protocol.decode_config(msg["config"]).replace(report=None, metrics=None)
    configure_torch(cfg.threads if msg.get("threads") is None else msg["threads"])
    setup, batch = task_setup(cfg)
    device = torch.device(msg["device"]) if msg["device"] != "cuda" else torch.device("cuda", torch.cuda.current_device())
    model = setup.model.to(device)
    params = [p.detach().clone() for p in model.parameters()]
    for p, w in zip(model.parameters(), params):  # the model computes straight at the W received
        p.data = w
    rounds = 0
    while True:
        msg = group.receive()
        op = msg.get("op")
        if op == "done":
            return {"rank": group.rank, "rounds": rounds}
        if op == "abort":
            raise GroupError(f"worker group rank 0 stopped the group: {msg.get('error')}")
        if op != "grad":
            raise GroupError(f"worker group: rank 0 sent an unknown command {op!r}")
        group.broadcast_params(params)
        group.gradients(model, setup.task.loss, batch(msg["client"], msg["round"]), params, msg["round"])
        rounds += 1


def start_message(config: bytes, device: str, threads: int | None = None) -> dict:
    return {"op": "start", "config": bytes(config), "device": device, "threads": threads}

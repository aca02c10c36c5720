"""The DDP side of `efmuon bench peers`: one rank of torch's DistributedDataParallel (gloo) training a
built-in task exactly as an efmuon run of the same config would see it, and the helpers around it.

    python -m efmuon.benchmarks.ddp_peer rank SPEC.json    one rank (started by benchmarks.peers inside
                                                          that rank's network namespace)
    python -m efmuon.benchmarks.ddp_peer probe             does batched_powerSGD_hook run? (one process)
    python -m efmuon.benchmarks.ddp_peer sweep [STEPS [MUON_LRS ADAMW_LRS]]   the optimizer's lr sweep
                                                          (in process; lrs comma-separated)

Same problem as efmuon: the model and its initial parameters come from `Setup(cfg)` (the seed), rank j
takes worker j's batches (`task.batch(j, k)` at step k = 1, 2, ...), and rank 0 evaluates
`task.eval_loss` every `eval_every` steps (then broadcasts it, so every rank stops at the same step).
Optimizer: torch.optim.Muon for the transformer blocks' 2-D matrices, AdamW for the embeddings and
the head (`param_groups`), both at a constant lr (efmuon's side runs `--schedule constant`), no weight
decay (efmuon's weight_decay is 0).

Gradient exchange (`HOOKS`): DDP's default allreduce (fp32), `default_hooks.fp16_compress_hook`, and
`powerSGD_hook.powerSGD_hook` with PowerSGDState(matrix_approximation_rank=8 or 16,
start_powerSGD_iter=2, error feedback and warm start on). `batched_powerSGD_hook` is not among them:
on torch 2.13 it fails at its first compressed step (`probe`: `_orthogonalize` asserts a 3-D batch of
matrices and is handed batched_powerSGD_hook's 2-D Q).

Measured per rank: the seconds of each training step (batch, forward, backward with the gradient
exchange, optimizer step; evaluations and start-up are outside), and the bytes of the rank's own
network interface (`/sys/class/net/DEV/statistics`, rx + tx: Ethernet frames incl. TCP/IP headers
and ACKs) since before `init_process_group`, at every evaluation.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from ..common.config import RunConfig
from ..common.model import Setup

HIDDEN_PREFIX = "blocks."  # the transformer blocks' matrices: Muon; everything else: AdamW
HOOKS = ("fp32", "fp16", "powersgd-r8", "powersgd-r16")

# Chosen by `sweep` (fp32 DDP emulated in one process, unshaped, gpt-char, 4 workers; BENCHMARKS.md "peers")
MUON_LR = 0.04
ADAMW_LR = 3e-3
MUON_MOMENTUM = 0.95
ADAMW_BETAS = (0.9, 0.95)
POWERSGD_START = 2


def setup_of(spec: dict):
    """The task's Setup (model with the seed's initial parameters, task) of an efmuon run of the same config."""
    cfg = RunConfig(task=spec["task"], task_options=dict(spec.get("task_options") or {}),
                    workers=int(spec["world"]), seed=int(spec.get("seed", 0)), threads=1)
    return Setup(cfg)


def param_groups(model: torch.nn.Module) -> tuple[list, list]:
    """(Muon's parameters: the blocks' 2-D matrices; AdamW's: the rest)."""
    hidden, other = [], []
    for name, p in model.named_parameters():
        (hidden if name.startswith(HIDDEN_PREFIX) and p.ndim == 2 else other).append(p)
    return hidden, other


def optimizers(model: torch.nn.Module, spec: dict) -> list[torch.optim.Optimizer]:
    hidden, other = param_groups(model)
    opts = [torch.optim.Muon(hidden, lr=float(spec.get("muon_lr", MUON_LR)), weight_decay=0.0,
                             momentum=float(spec.get("momentum", MUON_MOMENTUM)), nesterov=True)]
    if other:
        opts.append(torch.optim.AdamW(other, lr=float(spec.get("adamw_lr", ADAMW_LR)),
                                      betas=tuple(spec.get("betas", ADAMW_BETAS)), weight_decay=0.0))
    return opts


def counters(dev: str) -> int:
    """rx + tx bytes of network interface `dev` in this process's namespace."""
    base = f"/sys/class/net/{dev}/statistics"
    total = 0
    for name in ("rx_bytes", "tx_bytes"):
        with open(f"{base}/{name}") as fh:
            total += int(fh.read())
    return total


def register_hook(ddp, hook: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook == "fp32":
        return
    if hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return
    if hook.startswith("powersgd-r"):
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=int(hook[len("powersgd-r"):]),
                                            start_powerSGD_iter=POWERSGD_START, use_error_feedback=True,
                                            warm_start=True, random_seed=0)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return
    raise ValueError(f"unknown DDP hook {hook!r}; choose one of {', '.join(HOOKS)}")


def rank_main(spec: dict) -> dict:
    """One DDP rank (module docstring): trains with spec["hook"], or with each of spec["hooks"] in turn on one
    process group (the suite's smoke run: one start-up and rendezvous for several variants), each from the
    seed's initial parameters. Writes and returns {rank, runs: [{hook, evals: [{step, val_loss, train_s, bytes}],
    step_s, steps, start_s, start_bytes, end_bytes}]}, bytes counted from each run's own start (the first
    run's from before `init_process_group`); rank 0 of a spec with "probe" also probes batched_powerSGD_hook
    after the group is gone ("batched_powerSGD_hook_error")."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world, dev = int(spec["rank"]), int(spec["world"]), spec.get("dev", "eth0")
    b0 = counters(dev) if dev else 0
    t_init = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"tcp://{spec['master']}:{spec['port']}", rank=rank,
                            world_size=world, timeout=__import__("datetime").timedelta(seconds=300))
    runs = []
    for hook in spec.get("hooks") or [spec["hook"]]:
        runs.append(_train(spec, hook, rank, dev, b0, t_init))
        b0, t_init = (counters(dev) if dev else 0), time.perf_counter()
    dist.destroy_process_group()
    out = {"rank": rank, "runs": runs}
    if spec.get("probe") and rank == 0:
        out["batched_powerSGD_hook_error"] = probe_batched()
    if spec.get("out"):
        with open(spec["out"], "w") as fh:
            json.dump(out, fh)
    return out


def _train(spec: dict, hook: str, rank: int, dev: str, b0: int, t_init: float) -> dict:
    """One training run with `hook` on the process group that exists: to the target or max_steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    setup = setup_of(spec)
    task, model = setup.task, setup.model
    ddp = DDP(model)
    register_hook(ddp, hook)
    opts = optimizers(model, spec)
    start_s = time.perf_counter() - t_init
    start_bytes = (counters(dev) - b0) if dev else 0
    every, target, max_steps = int(spec["eval_every"]), float(spec["target"]), int(spec["max_steps"])
    evals, step_s, train_s, flag = [], [], 0.0, torch.zeros(1, dtype=torch.float64)
    for k in range(1, max_steps + 1):
        t0 = time.perf_counter()
        batch = task.batch(rank, k)
        loss = task.loss(ddp, batch)
        loss.backward()
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        step_s.append(dt)
        train_s += dt
        if k % every == 0 or k == max_steps:
            if rank == 0:
                model.eval()
                with torch.no_grad():
                    flag[0] = float(task.eval_loss(model))
                model.train()
            dist.broadcast(flag, 0)
            val = float(flag[0])
            evals.append({"step": k, "val_loss": val, "train_s": train_s,
                          "bytes": (counters(dev) - b0) if dev else 0, "train_loss": float(loss.detach())})
            if val <= target:
                break
    dist.barrier()
    return {"hook": hook, "evals": evals, "steps": len(step_s), "step_s": step_s, "start_s": start_s,
            "start_bytes": start_bytes, "end_bytes": (counters(dev) - b0) if dev else 0}


def probe_batched() -> str:
    """Run batched_powerSGD_hook for a few steps in a world of one (gloo); '' if it works, else the error
    (its type, message and the frame that raised it)."""
    import traceback

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        ddp = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 8, bias=False)))
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD_hook.batched_powerSGD_hook)
        try:
            for _ in range(4):
                ddp(torch.randn(4, 64, generator=g)).sum().backward()
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            where = "; ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in tb[-2:])
            return f"{type(exc).__name__}{(': ' + str(exc)) if str(exc) else ''} (at {where})"
        return ""
    finally:
        dist.destroy_process_group()


def emulate(spec: dict) -> list[dict]:
    """fp32 DDP in one process: every step averages the `world` workers' gradients at the same parameters
    (what DDP's allreduce gives every rank) and steps the same optimizers. [{step, val_loss}] every
    eval_every steps up to max_steps, or the first at or below spec["target"] when given. For the lr sweep only."""
    torch.set_num_threads(1)
    setup = setup_of(spec)
    task, model, world = setup.task, setup.model, int(spec["world"])
    opts = optimizers(model, spec)
    params = list(model.parameters())
    out = []
    for k in range(1, int(spec["max_steps"]) + 1):
        grads = [torch.zeros_like(p) for p in params]
        for j in range(world):
            model.zero_grad(set_to_none=True)
            task.loss(model, task.batch(j, k)).backward()
            for g, p in zip(grads, params):
                g.add_(p.grad, alpha=1.0 / world)
        for p, g in zip(params, grads):
            p.grad = g
        for o in opts:
            o.step()
        if k % int(spec["eval_every"]) == 0:
            model.eval()
            with torch.no_grad():
                out.append({"step": k, "val_loss": float(task.eval_loss(model))})
            model.train()
            if spec.get("target") is not None and out[-1]["val_loss"] <= float(spec["target"]):
                break
    return out


SWEEP_MUON = (0.01, 0.02, 0.04, 0.08)
SWEEP_ADAMW = (1e-3, 3e-3, 1e-2)


def sweep(steps: int = 200, target: float = 1.90, muon_lrs=SWEEP_MUON, adamw_lrs=SWEEP_ADAMW) -> list[dict]:
    """The lr sweep behind MUON_LR / ADAMW_LR: steps to `target` of emulated fp32 DDP, gpt-char, 4 workers."""
    rows = []
    for muon_lr in muon_lrs:
        for adamw_lr in adamw_lrs:
            spec = {"task": "gpt-char", "world": 4, "max_steps": steps, "eval_every": 5,
                    "muon_lr": muon_lr, "adamw_lr": adamw_lr, "target": target}
            t0 = time.perf_counter()
            evals = emulate(spec)
            hit = next((e["step"] for e in evals if e["val_loss"] <= target), None)
            rows.append({"muon_lr": muon_lr, "adamw_lr": adamw_lr, "steps_to_target": hit,
                         "final_val_loss": evals[-1]["val_loss"], "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "rank":
        with open(argv[1]) as fh:
            rank_main(json.load(fh))
        return 0
    if argv and argv[0] == "probe":
        print(json.dumps({"batched_powerSGD_hook_error": probe_batched()}), flush=True)
        return 0
    if argv and argv[0] == "sweep":
        grid = [tuple(float(x) for x in a.split(",")) for a in argv[2:4]]
        sweep(int(argv[1]) if len(argv) > 1 else 200, 1.90, *grid)
        return 0
    print("usage: python -m efmuon.benchmarks.ddp_peer rank SPEC.json | probe | sweep [STEPS [MUON_LRS ADAMW_LRS]]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

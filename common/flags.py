"""The flags every command shares (run, server, simulate), and the RunConfig they give.

defaults < --config FILE.toml < flags; each flag sets the RunConfig field of the same name. The CLI
(`efmuon.cli`) adds these to each subcommand; they are here, in common, because the flag names are the
config's contract (docs/design.md §8), the same for every driver.
"""
from __future__ import annotations

import argparse

from .config import (
    DEFAULT_DOWNLINK,
    DEFAULT_UPLINK,
    DEVICES,
    INITS,
    METHODS,
    NS_COEFFS,
    PRESETS,
    SCHEDULES,
    TASKS,
    RunConfig,
    from_mapping,
    load_toml,
)

SPEC_HELP = ("compressor SPEC: identity, identity:bf16, identity:fp16, topk:0.1 (fraction) or topk:1000 (k), "
             "randk:0.1, rankk:4, natural, quant:8, sign; composed with '+', e.g. topk:0.05+natural, rankk:4+bf16")


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, value


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by run, server, worker and simulate. Defaults are None: unset flags don't override the file."""
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="FILE.toml", help="TOML file of settings; flags override it; unknown keys are an error")
    g.add_argument("--task", choices=TASKS, help="built-in task (default gpt-char)")
    g.add_argument("--model", metavar="MODULE:FACTORY",
                   help="train your own model instead of a built-in task: a function in a module importable here "
                        "and on every worker (the current folder counts; else PYTHONPATH) that returns "
                        "efmuon.common.usermodel.UserModel (README, 'Your own model'); replaces --task (default: none)")
    g.add_argument("--task-option", action="append", type=_kv, default=None, metavar="KEY=VALUE",
                   help="task option, e.g. dirichlet=0.3 for digits (repeatable)")
    g.add_argument("--workers", type=int, help="number of workers n (default 4)")
    g.add_argument("--rounds", type=int, help="number of rounds (default: the task's)")
    g.add_argument("--seed", type=int, help="seed of data, init and compressor randomness (default 0)")
    g.add_argument("--device", choices=DEVICES, help="where tensors live: cpu, cuda or auto (default cpu)")
    g.add_argument("--threads", type=int, help="torch threads per process (default 1: keeps runs bit-reproducible)")
    g.add_argument("--lmo-threads", type=int, metavar="N",
                   help="torch threads for the server's Newton-Schulz step (default 0 = automatic: every core the "
                        "process may use once a step is >= 1 GFLOP, else --threads); set 1 on a machine shared "
                        "with the workers")
    g.add_argument("--report", metavar="PATH.json", help="write the JSON report here")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (defaults < task < --config < flags) and every parameter "
                        "with its shape, norm and compressors (the names per-layer patterns match), then exit")
    g.add_argument("--metrics", metavar="PATH.jsonl", help="stream one JSON line per round here")
    g.add_argument("--eval-every", type=int, help="evaluate loss at W and X every N rounds (default 1)")
    g.add_argument("--log-every", type=int, help="print a progress line every N rounds (default 10)")
    a = p.add_argument_group("algorithm (EF21-Muon)")
    a.add_argument("--method", choices=METHODS, help="ef21 (default) or ef14 (classic residual error feedback, a baseline)")
    a.add_argument("--preset", choices=PRESETS, help="LMO preset, or adamw: AdamW on the aggregate G, no LMO (default: the task's, usually muon)")
    a.add_argument("--lr", type=float, help="step size t (radius of the LMO step)")
    a.add_argument("--beta", type=float, help="momentum weight of the NEW gradient, in (0, 1] (default 0.1)")
    a.add_argument("--schedule", choices=SCHEDULES, help="step-size schedule after warm-up")
    a.add_argument("--warmup", type=int, help="rounds of linear warm-up")
    a.add_argument("--weight-decay", type=float, help="decoupled weight decay on X")
    a.add_argument("--init", choices=INITS, help="G_j = M_j = g_j(X_0) sent once (grad, default) or 0 (zero)")
    a.add_argument("--ns-steps", type=int, help="Newton-Schulz steps (default 5)")
    a.add_argument("--ns-coeffs", choices=NS_COEFFS, help="Newton-Schulz coefficients (default jordan)")
    a.add_argument("--f-star", type=float, metavar="F",
                   help="--preset muonmax-momo: lower bound F* of the training loss in the Momo truncation "
                        "t = min(lr, (model - F*)_+ / dual^2) (default 0)")
    a.add_argument("--ef14-variant", choices=("classic", "airbench"), help="with --method ef14")
    a.add_argument("--ef14-bits", type=int, help="airbench variant: bits of the quantised update (4/8/16/32)")
    f = p.add_argument_group("federated (n clients, a cohort per round, per-client links; simulate on a simulated clock, "
                             "run/server over the network with the same rules and bits; links shape each worker, see --shaping)")
    f.add_argument("--clients", type=int, help="number of clients n (federated: the server then samples a cohort per round; "
                   "--workers stays the synchronous count)")
    f.add_argument("--participation", type=float, metavar="P",
                   help="fraction of the n clients sampled per round, in (0, 1] (at least 1; deterministic per seed and "
                        "round; the networked server draws from the clients that are live; default 1)")
    f.add_argument("--link", metavar="PROFILE", help="one link for every client: a preset (none, dsl, lte, wifi, dc-10g) "
                   "or 'up=10mbit,down=50mbit,delay=20ms[,jitter=5ms,loss=0.1%%]'")
    f.add_argument("--link-mix", metavar="MIX", help="per-client presets drawn from a distribution, e.g. 'dsl=0.3,lte=0.5,wifi=0.2'")
    f.add_argument("--link-trace", metavar="FILE.csv", help="per-client links, rows client,up_bps,down_bps,delay_ms[,jitter_ms]")
    f.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="round deadline: sampled clients slower than this are dropped from the round (stragglers; simulate: "
                        "on the simulated clock, run/server: seconds after the round opened; default: none)")
    f.add_argument("--adaptive-deadline", type=float, metavar="K",
                   help="adaptive round deadline: median + K * MAD of the completion times of the clients that made "
                        "the last 10 rounds (once 10 times are known; before that --deadline or none), never above "
                        "--deadline (default: off)")
    f.add_argument("--compute-scale", metavar="DIST", help="per-client compute speed factor: a number, 'lognormal:SIGMA' "
                   "(median 1) or 'uniform:LO:HI', then optionally ',J=FACTOR' per client (e.g. '1,3=40'); networked "
                   "workers sleep to emulate it (default 1)")
    f.add_argument("--compute-seconds", type=float, metavar="S",
                   help="gradient time per client and round before --compute-scale (simulate: simulated; networked workers "
                        "pad their compute to it; default: measured)")
    g.add_argument("--plots", metavar="DIR", help="write PNG plots here (default: next to --report; 'none' to skip)")
    c = p.add_argument_group("compression")
    c.add_argument("--uplink", metavar="SPEC", help=f"worker->server compressor (default {DEFAULT_UPLINK}); {SPEC_HELP}")
    c.add_argument("--downlink", metavar="SPEC", help=f"server->worker compressor (default {DEFAULT_DOWNLINK})")


_FLAG_TO_KEY = {
    "task": "task", "model": "model", "workers": "workers", "rounds": "rounds", "seed": "seed", "device": "device",
    "threads": "threads", "lmo_threads": "lmo_threads", "report": "report", "metrics": "metrics", "eval_every": "eval_every",
    "log_every": "log_every", "method": "method", "preset": "preset", "lr": "lr", "beta": "beta",
    "schedule": "schedule", "warmup": "warmup", "weight_decay": "weight_decay", "init": "init",
    "ns_steps": "ns_steps", "ns_coeffs": "ns_coeffs", "ef14_variant": "ef14_variant", "ef14_bits": "ef14_bits",
    "f_star": "f_star",
    "uplink": "uplink", "downlink": "downlink", "plots": "plots",
    "clients": "clients", "participation": "participation", "link": "link", "link_mix": "link_mix",
    "link_trace": "link_trace", "deadline": "deadline", "compute_scale": "compute_scale",
    "compute_seconds": "compute_seconds", "adaptive_deadline": "adaptive_deadline",
}


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """defaults < --config FILE < flags."""
    cfg = base or RunConfig()
    if getattr(args, "config", None):
        cfg = load_toml(args.config, cfg)
    overrides = {key: getattr(args, flag) for flag, key in _FLAG_TO_KEY.items() if getattr(args, flag, None) is not None}
    if getattr(args, "task_option", None):
        overrides["task_options"] = {**cfg.task_options, **dict(args.task_option)}
    return from_mapping(overrides, cfg, where="flags")

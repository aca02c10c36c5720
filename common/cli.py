"""`efmuon`: one command, with subcommands; the same flags mean the same thing everywhere.

    efmuon run       [flags]                      server + N local worker processes (the embedded default)
    efmuon server    --port P [flags]             the server alone (multi-machine)
    efmuon worker    --server HOST:PORT [flags]   one worker (multi-machine)
    efmuon simulate  [flags]                      one process, virtual workers, no gRPC
"""
from __future__ import annotations

import argparse
import sys

from efmuon.common.config import (
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
from efmuon.common.errors import EfmuonError

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
    g.add_argument("--metrics", metavar="PATH.jsonl", help="stream one JSON line per round here")
    g.add_argument("--eval-every", type=int, help="evaluate loss at W and X every N rounds (default 1)")
    g.add_argument("--log-every", type=int, help="print a progress line every N rounds (default 10)")
    a = p.add_argument_group("algorithm (EF21-Muon)")
    a.add_argument("--method", choices=METHODS, help="ef21 (default) or ef14 (classic residual error feedback, a baseline)")
    a.add_argument("--preset", choices=PRESETS, help="LMO preset (default: the task's, usually muon)")
    a.add_argument("--lr", type=float, help="step size t (radius of the LMO step)")
    a.add_argument("--beta", type=float, help="momentum weight of the NEW gradient, in (0, 1] (default 0.1)")
    a.add_argument("--schedule", choices=SCHEDULES, help="step-size schedule after warm-up")
    a.add_argument("--warmup", type=int, help="rounds of linear warm-up")
    a.add_argument("--weight-decay", type=float, help="decoupled weight decay on X")
    a.add_argument("--init", choices=INITS, help="G_j = M_j = g_j(X_0) sent once (grad, default) or 0 (zero)")
    a.add_argument("--ns-steps", type=int, help="Newton-Schulz steps (default 5)")
    a.add_argument("--ns-coeffs", choices=NS_COEFFS, help="Newton-Schulz coefficients (default jordan)")
    a.add_argument("--ef14-variant", choices=("classic", "airbench"), help="with --method ef14")
    a.add_argument("--ef14-bits", type=int, help="airbench variant: bits of the quantised update (4/8/16/32)")
    f = p.add_argument_group("federated (simulate: n clients, partial participation, per-client links, simulated clock; "
                             "run: --link/--link-mix/--link-trace shape each worker, see --shaping)")
    f.add_argument("--clients", type=int, help="number of clients n (federated; sets n, --workers stays the synchronous count)")
    f.add_argument("--participation", type=float, metavar="P",
                   help="fraction of the n clients sampled per round, in (0, 1] (at least 1; deterministic per seed and round)")
    f.add_argument("--link", metavar="PROFILE", help="one link for every client: a preset (none, dsl, lte, wifi, dc-10g) "
                   "or 'up=10mbit,down=50mbit,delay=20ms[,jitter=5ms,loss=0.1%%]'")
    f.add_argument("--link-mix", metavar="MIX", help="per-client presets drawn from a distribution, e.g. 'dsl=0.3,lte=0.5,wifi=0.2'")
    f.add_argument("--link-trace", metavar="FILE.csv", help="per-client links, rows client,up_bps,down_bps,delay_ms[,jitter_ms]")
    f.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="simulated round deadline: sampled clients slower than this are dropped from the round (stragglers)")
    f.add_argument("--compute-scale", metavar="DIST", help="per-client compute speed factor: a number, 'lognormal:SIGMA' "
                   "(median 1) or 'uniform:LO:HI' (default 1)")
    f.add_argument("--compute-seconds", type=float, metavar="S",
                   help="simulated gradient time per client and round (default: measured in this process)")
    g.add_argument("--plots", metavar="DIR", help="write PNG plots here (default: next to --report; 'none' to skip)")
    c = p.add_argument_group("compression")
    c.add_argument("--uplink", metavar="SPEC", help=f"worker->server compressor (default {DEFAULT_UPLINK}); {SPEC_HELP}")
    c.add_argument("--downlink", metavar="SPEC", help=f"server->worker compressor (default {DEFAULT_DOWNLINK})")


_FLAG_TO_KEY = {
    "task": "task", "workers": "workers", "rounds": "rounds", "seed": "seed", "device": "device",
    "threads": "threads", "lmo_threads": "lmo_threads", "report": "report", "metrics": "metrics", "eval_every": "eval_every",
    "log_every": "log_every", "method": "method", "preset": "preset", "lr": "lr", "beta": "beta",
    "schedule": "schedule", "warmup": "warmup", "weight_decay": "weight_decay", "init": "init",
    "ns_steps": "ns_steps", "ns_coeffs": "ns_coeffs", "ef14_variant": "ef14_variant", "ef14_bits": "ef14_bits",
    "uplink": "uplink", "downlink": "downlink", "plots": "plots",
    "clients": "clients", "participation": "participation", "link": "link", "link_mix": "link_mix",
    "link_trace": "link_trace", "deadline": "deadline", "compute_scale": "compute_scale",
    "compute_seconds": "compute_seconds",
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


def cmd_simulate(args: argparse.Namespace) -> int:
    from efmuon.common.simulate import simulate

    cfg = config_from_args(args)
    simulate(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efmuon",
        description="EF21-Muon parameter server: workers send compressed estimator differences up, "
                    "the server takes the Muon LMO step and sends compressed model differences down.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'efmuon COMMAND --help' for a command's flags. With no arguments, 'efmuon run' trains "
               "the built-in gpt-char model with 4 local workers and compression both ways.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("simulate", help="one process, n virtual workers, no gRPC (exact payload bytes)",
                       description="Drive the EF21-Muon state objects for n virtual workers in one process.")
    add_common_flags(p)
    p.set_defaults(func=cmd_simulate)

    b = sub.add_parser("bench", help="benchmarks: bytes, bytes-wire, codecs, lmo, methods, transport, scaling, memory, soak",
                       description="Run one benchmark: prints a table, writes JSON with a goals list, and with "
                                   "--markdown updates its section of BENCHMARKS.md.")
    b.add_argument("name", help="bytes | bytes-wire | codecs | lmo | methods | transport | scaling | memory | soak")
    b.add_argument("--quick", action="store_true", help="a few seconds: a smoke version")
    b.add_argument("--report", metavar="PATH.json", help="write the JSON result here")
    b.add_argument("--markdown", metavar="BENCHMARKS.md", help="update this file's section for the benchmark")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("compare", help="overlay run reports in one figure and print a table",
                       description="Overlay JSON reports of simulate/run/server: loss vs rounds and loss vs bytes "
                                   "(log scale) in one PNG, and a table of rounds, final loss at W and X, bytes "
                                   "up/down and the saving against uncompressed fp32.")
    c.add_argument("reports", nargs="+", metavar="REPORT.json", help="reports to compare")
    c.add_argument("--out", default="compare.png", metavar="PATH.png", help="figure to write (default compare.png)")
    c.add_argument("--label", action="append", default=None, help="legend label per report, in order (repeatable; "
                   "default: the file names)")
    c.set_defaults(func=cmd_compare)

    _add_service_commands(sub)
    return parser


def cmd_compare(args: argparse.Namespace) -> int:
    from efmuon.common.compare import compare

    compare(args.reports, out=args.out, labels=args.label)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from efmuon.common.bench import run_bench

    command = "efmuon bench " + args.name + (" --quick" if args.quick else "")
    run_bench(args.name, args.quick, args.report, args.markdown, command)
    return 0


def _add_service_commands(sub) -> None:
    """run / server / worker live in efmuon.server and efmuon.worker; import lazily (no grpc for simulate)."""
    try:
        from efmuon.server.cli import add_commands
    except ImportError as exc:  # the service is optional for a pure-algorithm install
        if "efmuon" not in str(exc):
            raise
        return
    add_commands(sub, add_common_flags, config_from_args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        argv = ["run"] + list(argv or [])
        if "run" not in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
            parser.print_help()
            return 2
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EfmuonError as exc:
        print(f"efmuon {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"efmuon {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

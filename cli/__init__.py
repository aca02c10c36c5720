"""`efmuon`: the one entry point; it assembles every subcommand, and no package below registers another's.

    efmuon run       [flags]                      server + N local worker processes (the embedded default)
    efmuon server    --port P [flags]             the server alone (multi-machine)
    efmuon worker    --server HOST:PORT [flags]   one worker (multi-machine)
    efmuon simulate  [flags]                      one process, virtual workers, no gRPC
    efmuon compare   A.json B.json                overlay reports
    efmuon certs     DIR                          development TLS certificates and tokens
    efmuon export    CKPT OUT.safetensors         a server checkpoint's W (or X) as a safetensors model file
    efmuon report    merge A.json B.json -o M.json  the reports of a sharded run's servers as one
    efmuon bench     NAME                         a benchmark (where efmuon.benchmarks is installed)

Each command's driver is imported when that command runs (lazy imports below, marked so): building the
parser loads neither torch nor grpc, and `efmuon simulate` never loads grpc.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys

from ..common.errors import EfmuonError
from ..common.flags import add_common_flags, config_from_args
from .certs import add_certs_parser
from .service import add_run_parser, add_server_parser
from .worker import add_worker_parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from ..simulate import simulate  # lazy: torch only when a command runs
    from .inspect import print_config  # lazy: torch only when a command runs

    cfg = config_from_args(args)
    if args.print_config:
        return print_config(cfg) or 0
    simulate(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efmuon",
        description="EF21-Muon parameter server: workers send compressed estimator differences up, "
                    "the server takes the Muon LMO step and sends compressed model differences down.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'efmuon COMMAND --help' for a command's flags. Start with 'efmuon run': it trains the "
               "built-in gpt-char model with 4 local workers and compression both ways (about a minute on 2 cores).",
    )
    parser.add_argument("--version", action="version", version=f"efmuon {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("simulate", help="one process, n virtual workers, no gRPC (exact payload bytes)",
                       description="Drive the EF21-Muon state objects for n virtual workers in one process.")
    add_common_flags(p)
    p.set_defaults(func=cmd_simulate)

    b = sub.add_parser("bench", help="benchmarks: bytes, bytes-10m, bytes-wire, codecs, lmo, methods, moe, lr-robustness, peers, pipeline, profile, rounds, transport, scaling, scaling-shards, federation, memory, soak, startup",
                       description="Run one benchmark: prints a table, writes JSON with a goals list, and with "
                                   "--markdown updates its section of BENCHMARKS.md.")
    b.add_argument("name", help="bytes | bytes-wire | codecs | lmo | methods | transport | scaling | memory | soak | "
                   "pipeline | profile | ... (all of them: `efmuon --help`, BENCHMARKS.md)")
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

    e = sub.add_parser("export", help="a server checkpoint's model as a safetensors file",
                       description="Write W (the model the workers hold; --which x: the server's X) of a server "
                                   "checkpoint as safetensors, keyed by the model's parameter names, with the task, "
                                   "config (JSON), round, w_sha256 and x_sha256 as metadata. Loads with "
                                   "safetensors.torch.load_file + model.load_state_dict(strict=True).")
    e.add_argument("checkpoint", metavar="CKPT", help="a server checkpoint directory (round-NNNNNN), or a "
                   "--checkpoint-dir DIR (its newest checkpoint)")
    e.add_argument("out", metavar="OUT.safetensors", help="the file to write")
    e.add_argument("--which", choices=("w", "x"), default="w",
                   help="w: the model the workers hold (default; the report's w_sha256); x: the server's iterate")
    e.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="reports: merge the reports of a sharded run's servers",
                       description="Work with run reports. `efmuon report merge A.json B.json -o merged.json`: the "
                                   "reports of `efmuon server --shard I/N` (one per shard) as one report of the whole "
                                   "run (docs/design.md §6.3): bytes summed, per shard under summary.shards, "
                                   "w_sha256/x_sha256 and the final losses of the whole model from the shards' "
                                   "layer files (REPORT.layers.safetensors beside each report).")
    rs = r.add_subparsers(dest="report_command", metavar="ACTION", required=True)
    m = rs.add_parser("merge", help="merge the shards' reports into one",
                      description="Merge the reports of every shard of one sharded run into one report.")
    m.add_argument("reports", nargs="+", metavar="REPORT.json", help="every shard's report (any order)")
    m.add_argument("-o", "--out", required=True, metavar="MERGED.json", help="the merged report to write "
                   "(no default: required)")
    m.add_argument("--no-eval", action="store_true", help="do not evaluate the final losses of the whole model "
                   "(no task build; the hashes are still computed) (default: evaluate)")
    m.set_defaults(func=cmd_report_merge)

    add_run_parser(sub)
    add_server_parser(sub)
    add_worker_parser(sub)
    add_certs_parser(sub)
    for command in sub.choices.values():
        _state_defaults(command)
    return parser


# The default of every option whose own help text does not say it (tests/test_cli_help.py checks that
# every option of every command states one).
DEFAULTS = {
    "--config": "none", "--report": "none; `efmuon run`: runs/<time>-<task>/report.json",
    "--metrics": "none", "--lr": "the task's: gpt-char 0.05, gpt 0.05, gpt-moe 0.05 (adamw 3e-3), digits 0.05, lsq 0.03; adamw elsewhere 1e-3",
    "--schedule": "the task's, usually cosine", "--warmup": "the task's, usually 0", "--weight-decay": "0",
    "--ef14-variant": "classic", "--ef14-bits": "8", "--clients": "none: the synchronous --workers clients",
    "--participation": "1: every client every round", "--link": "none: unshaped", "--link-mix": "none",
    "--link-trace": "none", "--deadline": "none: no stragglers dropped", "--markdown": "none",
    "--checkpoint-dir": "none: no checkpoints", "--resume": "none: a new run",
    "--tls-cert": "none: plaintext", "--tls-key": "none", "--tls-ca": "none: no client certificates",
    "--token-file": "none: no tokens", "--token": "none", "--stats": "none", "--save-model": "none",
    "--metrics-port": "none: no metrics endpoint",
}


def _state_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk of its options
        flag = action.option_strings[0] if action.option_strings else None
        if flag in DEFAULTS and "default" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: {DEFAULTS[flag]})".lstrip()


def cmd_compare(args: argparse.Namespace) -> int:
    from ..common.compare import compare  # lazy: matplotlib only for this command

    compare(args.reports, out=args.out, labels=args.label)
    return 0


def cmd_report_merge(args: argparse.Namespace) -> int:
    from ..common.shardmerge import merge_files  # lazy: torch and safetensors only for this command

    merged = merge_files(args.reports, args.out, evaluate=not args.no_eval)
    s = merged["summary"]
    print(f"efmuon report merge: {len(s['shards'])} shards, {s.get('rounds')} rounds; w_sha256 {s.get('w_sha256')}; "
          f"wrote {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..common.export import export_checkpoint  # lazy: torch and safetensors only for this command

    meta = export_checkpoint(args.checkpoint, args.out, which=args.which, force=args.force)
    print(f"efmuon export: wrote {meta['tensors']} of round {meta['round']} (task {meta['task']}, "
          f"sha256 {meta['sha256']}) to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ..benchmarks import run_bench  # lazy: the benchmarks import every layer

    command = "efmuon bench " + args.name + (" --quick" if args.quick else "")
    run_bench(args.name, args.quick, args.report, args.markdown, command)
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("efmuon")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that is not installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        print("\nefmuon: no command given; `efmuon run` trains the embedded default", file=sys.stderr)
        return 2
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

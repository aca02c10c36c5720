"""`efmuon run` and `efmuon server`: their flags, and the commands that hand them to efmuon.server."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ..common.config import RunConfig, from_mapping
from ..common.errors import ConfigError
from ..common.flags import add_common_flags, config_from_args

DEFAULT_PORT = 50051
CLIENTS_PER_PROCESS = 16  # efmuon run --clients-per-process (server.local.CLIENTS_PER_PROCESS)


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """Resilience, validation, bounds, security and operations flags of `efmuon server` and `efmuon run`."""
    r = p.add_argument_group("resilience (checkpoints, deadlines)")
    r.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="write server checkpoints here (atomically; DIR/LATEST names the newest): X, W, G, every "
                        "G_j, each client's last round, the last downlink, RNG states, the config, the report")
    r.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                   help="checkpoint every K rounds (default: only at the end and at shutdown; 1 makes a resumed "
                        "run bit-identical to an uninterrupted one)")
    r.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run checkpointed in DIR (the newest checkpoint there, or DIR/round-NNNNNN): "
                        "its configuration and server options, TLS and tokens included (flags may change only "
                        "execution settings and options given again). New checkpoints go to DIR (the parent of "
                        "a round-NNNNNN). Workers reconnect by themselves")
    r.add_argument("--auto-resume", action="store_true",
                   help="with --checkpoint-dir DIR: continue the run checkpointed there when DIR holds a checkpoint "
                        "(as --resume DIR, with the same flags), else start it; for a server that a service manager "
                        "restarts (systemd, Kubernetes, Compose: deploy/). Default: off (a DIR with checkpoints is "
                        "refused without --resume or --fresh)")
    r.add_argument("--fresh", action="store_true",
                   help="start a new run in a --checkpoint-dir that holds an earlier run's checkpoints, deleting "
                        "them (without it, such a directory is refused: resume it with --resume DIR)")
    r.add_argument("--round-deadline", type=float, default=None, metavar="SECONDS",
                   help="a round waits at most this long for every client's submission (default 600; 0: forever); "
                        "a crashed or departed worker may re-join within it")
    r.add_argument("--on-deadline", choices=("fail", "proceed"), default=None,
                   help="at the deadline: fail the run loudly (default) or proceed with the clients present "
                        "(G += (1/n) sum over them; the others re-sync when they come back)")
    p.add_argument("--pipeline", action="store_true", default=None,
                   help="pipelined rounds: decode each uplink frame as it arrives and take each LMO unit's step "
                        "as soon as every client's frames of it are in, while the rest still streams (the same "
                        "bits as without; docs/design.md §4). Not for muonmax, muonmax-momo, adamw, ef14, cohort "
                        "runs or shards: those stay sequential, with a warning (default: off)")
    f = p.add_argument_group("federation (with --clients/--participation/--deadline: cohort rounds, docs/design.md §6)")
    f.add_argument("--min-cohort", type=int, default=None, metavar="M",
                   help="a round needs at least M eligible clients to draw its cohort from; with fewer it waits "
                        "for clients up to --round-deadline, then proceeds or fails by --on-deadline (default 1)")
    f.add_argument("--client-timeout", type=float, default=None, metavar="SECONDS",
                   help="a member with no call open and not heard from for this long is left out of the cohorts "
                        "until it calls again (it vanished; default 60)")
    m = p.add_argument_group("the trained model")
    m.add_argument("--save-model", metavar="PATH.safetensors", default=None,
                   help="when the run has finished, write W (the model the workers hold) here as safetensors, "
                        "keyed by the model's parameter names, with the task, config, round and w_sha256 as "
                        "metadata (an existing file is refused; not written for an interrupted run: use "
                        "`efmuon export CKPT` on its checkpoint, which also writes X with --which x)")
    v = p.add_argument_group("validation and bounds")
    v.add_argument("--nan-policy", choices=("reject", "zero"), default=None,
                   help="uplink frames with NaN/Inf: refuse them (INVALID_ARGUMENT, default) or replace the "
                        "values by 0 and count them (Status.nonfinite_zeroed, summary.resilience)")
    v.add_argument("--max-clients", type=int, default=None, help="most live sessions (and --workers) (default 1024)")
    v.add_argument("--max-message-bytes", type=int, default=None, metavar="BYTES",
                   help="gRPC message size limit, both directions (default 64 MiB; chunks are <= 1 MiB)")
    v.add_argument("--estimators", choices=("fp32", "bf16", "disk"), default=None,
                   help="how the server keeps each client's G_j for re-sync: fp32 in memory (default, exact), "
                        "bf16 (half the memory; a re-synced G_j is rounded), disk (np.memmap under "
                        "--checkpoint-dir/estimators)")
    s = p.add_argument_group("security (TLS, tokens)")
    s.add_argument("--tls-cert", metavar="CERT.pem", default=None, help="server certificate: serve TLS")
    s.add_argument("--tls-key", metavar="KEY.pem", default=None, help="the server certificate's key")
    s.add_argument("--tls-ca", metavar="CA.pem", default=None,
                   help="mutual TLS: workers must present a client certificate this CA signed")
    s.add_argument("--token-file", metavar="FILE", default=None,
                   help="bearer tokens, one 'CLIENT_ID TOKEN' (or '* TOKEN') per line; calls without a listed "
                        "token get UNAUTHENTICATED. `efmuon certs DIR` makes certificates and tokens")
    o = p.add_argument_group("operations (health checks and reflection are always on)")
    o.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics, on the gRPC server's host (HTTPS "
                        "with --tls-cert; 0: any free port, printed; default: off)")


# server option field <- flag (argparse dest); a flag left unset (None) keeps the dataclass default, or on
# --resume the resumed run's value
_OPTION_FLAGS = {"checkpoint_every": "checkpoint_every", "round_deadline": "round_deadline",
                 "on_deadline": "on_deadline", "nan_policy": "nan_policy", "max_clients": "max_clients",
                 "max_message_bytes": "max_message_bytes", "estimators": "estimators", "tls_cert": "tls_cert",
                 "tls_key": "tls_key", "tls_ca": "tls_ca", "token_file": "token_file", "save_model": "save_model",
                 "metrics_port": "metrics_port", "min_cohort": "min_cohort", "client_timeout": "client_timeout",
                 "shard": "shard", "pipeline": "pipeline"}


def options_from_args(args: argparse.Namespace, resume=None):
    """ServerOptions from the flags; with `resume` (a loaded checkpoint), completed by the options of the run
    it continues (server.options.resumed_options). Also refuses a --checkpoint-dir that holds an earlier run
    unless --resume or --fresh (server.options.check_checkpoint_dir)."""
    from ..server import options as so  # lazy: the server package only when the command runs

    given = {f: getattr(args, a) for f, a in _OPTION_FLAGS.items() if getattr(args, a, None) is not None}
    if "round_deadline" in given:
        given["round_deadline"] = None if given["round_deadline"] == 0 else given["round_deadline"]
    opts = so.ServerOptions(checkpoint_dir=args.checkpoint_dir or resume_dir(args), **given)
    if resume is not None:
        where = resume[1].get("path")
        opts = so.resumed_options(opts, (resume[1].get("extra") or {}).get("server_options"), set(given), where)
        logging.getLogger("efmuon.server").warning("resuming %s; new checkpoints go to %s", where, opts.checkpoint_dir)
    so.check_checkpoint_dir(opts.checkpoint_dir, resuming=resume is not None, fresh=getattr(args, "fresh", False))
    if opts.save_model:
        from ..common.export import check_output  # lazy: safetensors only when the command runs

        check_output(opts.save_model, force_flag=None)  # refused now, not after the training
    return opts.validate()


def resume_dir(args: argparse.Namespace) -> str | None:
    """Where a resumed run writes its checkpoints: --resume DIR itself, or the run directory that holds the
    round-NNNNNN checkpoint --resume names (so the next `--resume DIR` continues from the newest, never
    again from the old one)."""
    if not args.resume:
        return None
    p = os.path.abspath(args.resume)
    return os.path.dirname(p) if os.path.isfile(os.path.join(p, "manifest.msgpack")) else p


def apply_auto_resume(args: argparse.Namespace) -> None:
    """--auto-resume: set --resume to --checkpoint-dir when that holds a checkpoint (else a new run starts there)."""
    if not getattr(args, "auto_resume", False):
        return
    if not args.checkpoint_dir:
        raise ConfigError("--auto-resume continues the run in --checkpoint-dir: give --checkpoint-dir DIR")
    if args.resume or args.fresh:
        raise ConfigError(f"--auto-resume chooses between resuming and starting: give it without "
                          f"{'--resume' if args.resume else '--fresh'}")
    from ..common.checkpoint_format import list_checkpoints  # lazy: torch only when the command runs

    if list_checkpoints(args.checkpoint_dir):
        logging.getLogger("efmuon.server").warning("--auto-resume: %s holds a checkpoint; resuming it",
                                                   args.checkpoint_dir)
        args.resume = args.checkpoint_dir


def config_and_resume(args: argparse.Namespace):
    """The run configuration (with --resume DIR: the checkpoint's, overlaid by the flags) and the loaded checkpoint."""
    if not args.resume:
        return config_from_args(args), None
    from ..common.checkpoint import (
        load_server,  # lazy: torch only when the command runs
    )

    loaded = load_server(args.resume)
    saved = loaded[1].get("config") or {}
    base = from_mapping(saved, RunConfig(), where=f"checkpoint {loaded[1].get('path')}")
    return config_from_args(args, base=base), loaded


def default_run_report(cfg: RunConfig) -> str:
    """runs/<YYYYmmdd-HHMMSS>-<task>/report.json under the current directory (a new one per run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{stamp}-{(cfg.model or cfg.task).replace(':', '-')}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return os.path.join(path, "report.json")


def cmd_run(args: argparse.Namespace) -> int:
    from ..server.local import (
        run_local,  # lazy: torch and grpc only when the command runs
    )

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.clients_per_process < 1:
        raise ConfigError(f"--clients-per-process {args.clients_per_process} is not a count: give an integer >= 1")
    apply_auto_resume(args)
    cfg, resume = config_and_resume(args)
    if args.shards is not None:
        from ..common.shards import check_shardable, parse_shard_count

        parse_shard_count(args.shards)
        check_shardable(cfg)
    if getattr(args, "shaping", None):
        cfg = from_mapping({"shaping": args.shaping}, cfg, where="flags")
    if getattr(args, "server_link", None):
        cfg = from_mapping({"server_link": args.server_link}, cfg, where="flags")
    if args.print_config:
        from .inspect import print_config  # lazy: torch only when a command runs

        return print_config(cfg) or 0
    if cfg.report is None:  # a newcomer's run leaves something to look at: the report and its plots
        cfg = cfg.replace(report=default_run_report(cfg))
    rounds = cfg.rounds or "the task's"
    from ..common.federation import federation_size, runs_cohorts

    who = (f"{federation_size(cfg)} clients, participation {cfg.participation or 1:g}" if runs_cohorts(cfg)
           else f"{cfg.workers} workers")
    print(f"efmuon run: task {cfg.task}, {who}, {rounds} rounds; starting the server and the "
          f"workers (the first progress line follows round 1); report: {cfg.report}", flush=True)
    if args.shards is not None:
        from ..server.shardrun import run_sharded  # lazy: torch and grpc only when the command runs

        if resume is not None:
            raise ConfigError("efmuon run --shards does not resume: resume each shard with `efmuon server --shard I/N "
                              "--resume DIR/shard-I` and its workers")
        report = run_sharded(cfg, args.shards, options=options_from_args(args, None),
                             clients_per_process=args.clients_per_process)
        return 130 if report["summary"].get("partial") else 0
    report = run_local(cfg, options=options_from_args(args, resume), resume=resume,
                       clients_per_process=args.clients_per_process)
    return 130 if report["summary"].get("partial") else 0


def cmd_server(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    apply_auto_resume(args)
    if not (args.resume or args.print_config) and (args.tls_cert is None) == (args.tls_key is None):
        # before torch is imported, so that a wrong --host/--port/TLS file fails at once; run_server checks
        # again with the final options (a resumed run's TLS files come from its checkpoint)
        from ..server.listen import check_listen  # lazy: grpc only when the command runs

        check_listen(args.host, args.port, args, args.insecure)
    cfg, resume = config_and_resume(args)
    if args.shard:
        from ..common.shards import check_shardable, parse_shard

        parse_shard(args.shard)
        check_shardable(cfg)
    if args.print_config:
        from .inspect import print_config  # lazy: torch only when a command runs

        return print_config(cfg) or 0
    from ..server.app import run_server  # lazy: torch only when the command runs

    report = run_server(cfg, args.host, args.port, options=options_from_args(args, resume), resume=resume,
                        insecure=args.insecure)
    return 130 if report["summary"].get("partial") else 0


def add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="server + N local worker processes over gRPC (the embedded default)",
        description="Start the parameter server on 127.0.0.1 (a free port) and N worker processes, train, "
                    "print progress and a summary. With no flags: gpt-char, 4 workers, compression both ways.")
    add_common_flags(p)
    p.add_argument_group("link emulation").add_argument(
        "--shaping", choices=("inproc", "netns"), default=None,
        help="how --link/--link-mix/--link-trace/[links] are emulated: inproc (default: each worker's relay "
             "shapes its connection, no root) or netns (a network namespace per worker and the server on a "
             "bridge, tc tbf per client and direction; delay by netem or the worker relay; needs root)")
    p.add_argument("--server-link", metavar="PROFILE", default=None,
                   help="with --shaping netns, the server's own link (tc tbf on its interface; up = towards the "
                        "server, the n uplinks together; down = from it, n copies of the downlink), a profile like "
                        "--link's; 'none' leaves it unshaped (default: the clients' link when --link gives them all "
                        "one, else unshaped)")
    p.add_argument_group("local worker processes").add_argument(
        "--clients-per-process", type=int, default=CLIENTS_PER_PROCESS, metavar="K",
        help=f"a run of more than K clients starts ceil(n / K) worker processes, each hosting K clients of a "
             f"contiguous range (`efmuon worker --clients A-B`: threads, one shared task, torch on 1 thread); "
             f"--shaping netns keeps one process per client (default {CLIENTS_PER_PROCESS})")
    p.add_argument_group("sharded servers").add_argument(
        "--shards", type=int, default=None, metavar="N",
        help="serve the model from N shard servers on this machine (each its own port and share of the layers, "
             "as `efmuon server --shard I/N`); the workers exchange with every shard in parallel, each shard "
             "writes REPORT.shardI.json and the report is their merge (docs/design.md §6.3); synchronous rounds, "
             "no links, no --resume (default: none, one server)")
    add_server_flags(p)
    p.set_defaults(func=cmd_run)


def add_server_parser(sub) -> None:
    p = sub.add_parser(
        "server", help="the parameter server alone (workers on other machines)",
        description="Serve one run: waits for --workers clients to Join, runs --rounds synchronous rounds, "
                    "writes the report and exits. Workers need only: efmuon worker --server HOST:PORT.")
    add_common_flags(p)
    n = p.add_argument_group("network")
    n.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface; "
                   "an address other than loopback needs --tls-cert/--tls-key, or --insecure)")
    n.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT}; 0 = any free)")
    n.add_argument("--insecure", action="store_true",
                   help="allow plaintext (no --tls-cert) on an address other than loopback (127.0.0.0/8, ::1, "
                        "localhost); the model, the updates and any tokens then cross the network unencrypted")
    n.add_argument("--shard", default=None, metavar="I/N",
                   help="serve shard I of N: only this server's share of the layers (a balanced cut by Newton-Schulz "
                        "FLOPs and bytes, the same on every process), synchronous rounds only; start one server per "
                        "shard and give the workers every address in shard order: --server HOST:P0,HOST:P1,... "
                        "(docs/design.md §6.3; merge the shards' reports with `efmuon report merge`) (default: none, "
                        "the whole model)")
    add_server_flags(p)
    p.set_defaults(func=cmd_server)

"""`efmuon run` and `efmuon server`: their flags, and the commands that hand them to efmuon.server."""
from __future__ import annotations

import argparse
import logging
import sys

from ..common.config import RunConfig, from_mapping
from ..common.flags import add_common_flags, config_from_args
from ..common.wire.protocol import MAX_MESSAGE_BYTES

DEFAULT_PORT = 50051


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """Resilience, validation, bounds and security flags of `efmuon server` and `efmuon run`."""
    r = p.add_argument_group("resilience (checkpoints, deadlines)")
    r.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="write server checkpoints here (atomically; DIR/LATEST names the newest): X, W, G, every "
                        "G_j, each client's last round, the last downlink, RNG states, the config, the report")
    r.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                   help="checkpoint every K rounds (default: only at the end and at shutdown; 1 makes a resumed "
                        "run bit-identical to an uninterrupted one)")
    r.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run checkpointed in DIR (its configuration; flags may change only execution "
                        "settings). Workers reconnect by themselves")
    r.add_argument("--round-deadline", type=float, default=None, metavar="SECONDS",
                   help="a round waits at most this long for every client's submission (default 600; 0: forever); "
                        "a crashed or departed worker may re-join within it")
    r.add_argument("--on-deadline", choices=("fail", "proceed"), default="fail",
                   help="at the deadline: fail the run loudly (default) or proceed with the clients present "
                        "(G += (1/n) sum over them; the others re-sync when they come back)")
    v = p.add_argument_group("validation and bounds")
    v.add_argument("--nan-policy", choices=("reject", "zero"), default="reject",
                   help="uplink frames with NaN/Inf: refuse them (INVALID_ARGUMENT, default) or replace the "
                        "values by 0 and count them (Status.nonfinite_zeroed, summary.resilience)")
    v.add_argument("--max-clients", type=int, default=1024, help="most live sessions (and --workers) (default 1024)")
    v.add_argument("--max-message-bytes", type=int, default=None, metavar="BYTES",
                   help="gRPC message size limit, both directions (default 64 MiB; chunks are <= 1 MiB)")
    v.add_argument("--estimators", choices=("fp32", "bf16", "disk"), default="fp32",
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


def options_from_args(args: argparse.Namespace):
    from ..server.options import (
        ServerOptions,  # lazy: the server package only when the command runs
    )

    deadline = 600.0 if args.round_deadline is None else (None if args.round_deadline == 0 else args.round_deadline)
    ckpt = args.checkpoint_dir or args.resume
    return ServerOptions(
        checkpoint_dir=ckpt, checkpoint_every=args.checkpoint_every or 0, round_deadline=deadline,
        on_deadline=args.on_deadline, nan_policy=args.nan_policy, max_clients=args.max_clients,
        max_message_bytes=args.max_message_bytes or MAX_MESSAGE_BYTES, estimators=args.estimators,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, token_file=args.token_file).validate()


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


def cmd_run(args: argparse.Namespace) -> int:
    from ..server.local import (
        run_local,  # lazy: torch and grpc only when the command runs
    )

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg, resume = config_and_resume(args)
    if getattr(args, "shaping", None):
        cfg = from_mapping({"shaping": args.shaping}, cfg, where="flags")
    report = run_local(cfg, options=options_from_args(args), resume=resume)
    return 130 if report["summary"].get("partial") else 0


def cmd_server(args: argparse.Namespace) -> int:
    from ..server.app import (
        run_server,  # lazy: torch and grpc only when the command runs
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg, resume = config_and_resume(args)
    report = run_server(cfg, args.host, args.port, options=options_from_args(args), resume=resume,
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
    add_server_flags(p)
    p.set_defaults(func=cmd_server)

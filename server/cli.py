"""`efmuon run`, `efmuon server` and `efmuon worker`, wired into common.cli's parser."""
from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_PORT = 50051


def add_commands(sub, add_common_flags, config_from_args) -> None:
    """Add run / server / worker to the `efmuon` subcommands (called by common.cli)."""

    def cmd_run(args: argparse.Namespace) -> int:
        from efmuon.server.app import run_local

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        cfg = config_from_args(args)
        if getattr(args, "shaping", None):
            from efmuon.common.config import from_mapping

            cfg = from_mapping({"shaping": args.shaping}, cfg, where="flags")
        report = run_local(cfg)
        return 130 if report["summary"].get("partial") else 0

    def cmd_server(args: argparse.Namespace) -> int:
        from efmuon.server.app import run_server

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        report = run_server(config_from_args(args), args.host, args.port)
        return 130 if report["summary"].get("partial") else 0

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
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "server", help="the parameter server alone (workers on other machines)",
        description="Serve one run: waits for --workers clients to Join, runs --rounds synchronous rounds, "
                    "writes the report and exits. Workers need only: efmuon worker --server HOST:PORT.")
    add_common_flags(p)
    n = p.add_argument_group("network")
    n.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface; "
                   "the protocol has no authentication, so expose it on trusted networks only)")
    n.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT}; 0 = any free)")
    p.set_defaults(func=cmd_server)

    from efmuon.worker.cli import add_worker_flags, cmd_worker

    p = sub.add_parser(
        "worker", help="one worker (the run configuration comes from the server)",
        description="Join a running `efmuon server`, build its built-in task and train client J's shard.")
    add_worker_flags(p)
    p.set_defaults(func=cmd_worker)

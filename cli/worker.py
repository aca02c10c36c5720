"""`efmuon worker` (also `python -m efmuon.worker`): one worker of a built-in task run."""
from __future__ import annotations

import argparse
import logging
import sys

from ..common.errors import ConfigError


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """The worker takes the run configuration from the server at Join, so it has only these flags."""
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="address of `efmuon server`")
    p.add_argument("--client-id", type=int, default=None, metavar="J",
                   help="client id 0..n-1 (chooses the data shard); default: the lowest free one")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="where this worker computes (default: the run configuration's device)")
    wire = p.add_mutually_exclusive_group()
    wire.add_argument("--client-wire", action="store_true",
                      help="count the connection's bytes in this worker too, through its in-process relay, and "
                           "send them to the server as a cross-check of its own count (the report's wire_client); "
                           "the extra hop costs goodput. Default: only with --link (the relay is there anyway)")
    wire.add_argument("--no-wire", action="store_true",
                      help="never send this worker's own byte counts (with --link the relay still shapes); the "
                           "server counts the wire bytes itself")
    p.add_argument("--link", metavar="PROFILE", default=None,
                   help="shape this worker's connection in its relay (in-process emulation, no root): a preset "
                        "(dsl, lte, wifi, dc-10g) or 'up=10mbit,down=50mbit,delay=20ms[,jitter=5ms,loss=0.1%%]'")
    p.add_argument("--stats", metavar="PATH.json", default=None,
                   help="write this worker's stats (bytes, transfer timings per call) as JSON when it finishes")
    r = p.add_argument_group("resilience and security")
    r.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="checkpoint this worker's state (W, M_j, G_j, the submission in flight) here every round; "
                        "a restarted worker resumes from it exactly (without it, the server re-syncs W and G_j "
                        "and the momentum restarts as M_j := G_j)")
    r.add_argument("--reconnect-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="after a lost connection or a server restart, keep re-joining for this long (default 300; "
                        "0: fail at once)")
    r.add_argument("--connect-timeout", type=float, default=None, metavar="SECONDS",
                   help="at start, keep trying to reach the server for this long (e.g. started before the server "
                        "listens; default: 30 or --reconnect-timeout, whichever is longer)")
    r.add_argument("--token", default=None, metavar="TOKEN", help="bearer token for the server's --token-file "
                   "(prefer --token-file: a command line is visible to other users)")
    r.add_argument("--token-file", default=None, metavar="FILE",
                   help="file with this worker's token (its 'J TOKEN' line, or just the token)")
    r.add_argument("--tls-ca", default=None, metavar="CA.pem", help="use TLS and trust the server certificate "
                   "this CA signed")
    r.add_argument("--tls-cert", default=None, metavar="CERT.pem", help="client certificate (mutual TLS)")
    r.add_argument("--tls-key", default=None, metavar="KEY.pem", help="client key (mutual TLS)")
    r.add_argument("--insecure", action="store_true",
                   help="allow sending the token without --tls-ca to a server off loopback (127.0.0.0/8, ::1, "
                        "localhost); anyone on the path can then read and reuse it")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def security_from_args(args: argparse.Namespace):
    """The worker's TLS/token settings, or None when none is given."""
    from ..worker.security import Security

    if args.token and args.token_file:
        raise ConfigError("give --token or --token-file, not both")
    token = args.token
    if args.token_file:
        from ..common.wire.credentials import read_token

        token = read_token(args.token_file, args.client_id)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key (mutual TLS), or neither")
    if args.tls_cert and not args.tls_ca:
        raise ConfigError("--tls-cert/--tls-key (mutual TLS) need --tls-ca to trust the server")
    if not (token or args.tls_ca):
        return None
    return Security(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, token=token,
                    insecure=args.insecure)


def _measure_wire(args: argparse.Namespace) -> bool | None:
    """--client-wire: True, --no-wire: False, neither: None (count in the relay when there is one)."""
    return True if args.client_wire else False if args.no_wire else None


def cmd_worker(args: argparse.Namespace) -> int:
    if args.client_id is not None and args.client_id < 0:
        raise ConfigError(f"--client-id {args.client_id} is not a client id: give 0..n-1 (n = the server's "
                          "--workers), or leave it out to be given the lowest free one")
    for flag, value in (("--reconnect-timeout", args.reconnect_timeout), ("--connect-timeout", args.connect_timeout)):
        if value is not None and not (value >= 0 and value < float("inf")):
            raise ConfigError(f"{flag} {value:g} is not a time: give seconds >= 0")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    link = None
    if args.link:
        from ..common.links import parse_link

        link = parse_link(args.link)
    from ..worker.reconnect import contact_window, reach

    conn, status = reach(args.server, contact_window(args.reconnect_timeout, args.connect_timeout),
                         _measure_wire(args), link, security_from_args(args))
    # lazy: torch only once the flags are checked and the server answered, so that a wrong address, a
    # TLS mistake or a bad flag fails at once, not after the seconds torch takes to load
    from ..worker.task import for_status

    worker = for_status(conn, status, client_id=args.client_id, device=args.device,
                        checkpoint_dir=args.checkpoint_dir, reconnect_timeout=args.reconnect_timeout,
                        connect_timeout=args.connect_timeout)
    stats = worker.run()
    if args.stats:
        import json

        out = {k: v for k, v in stats.items() if k != "history"}
        out["link"] = link.to_spec() if link is not None else None
        with open(args.stats, "w") as fh:
            json.dump(out, fh)
    if not args.quiet:
        w = stats["wire"]
        print(f"worker {stats['client_id']}: {stats['rounds']} rounds; payload up {stats['payload']['up']} B, "
              f"down {stats['payload']['down']} B" + (f"; wire up {w['up']} B, down {w['down']} B" if w else "")
              + f"; w_sha256 {stats['w_sha256']}", flush=True)
    return 0


def add_worker_parser(sub) -> None:
    p = sub.add_parser(
        "worker", help="one worker (the run configuration comes from the server)",
        description="Join a running `efmuon server`, build its built-in task and train client J's shard.")
    add_worker_flags(p)
    p.set_defaults(func=cmd_worker)

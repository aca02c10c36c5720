"""`efmuon certs DIR`: development TLS certificates and tokens (efmuon.server.certs makes them)."""
from __future__ import annotations

import argparse

from ..server.certs import DEFAULT_HOSTS, VALID_DAYS, make_dev_certs


def add_certs_parser(sub) -> argparse.ArgumentParser:
    """Add `efmuon certs DIR` to an argparse subparsers object."""
    p = sub.add_parser("certs", help="make development TLS certificates (CA, server, clients) and tokens",
                       description="Write a development CA, a server certificate for --host names/IPs, client "
                                   "certificates for mutual TLS and per-client bearer tokens into DIR, and print "
                                   "the server and worker flags that use them.")
    p.add_argument("dir", metavar="DIR", help="directory to write into (created if missing)")
    p.add_argument("--host", action="append", default=None, metavar="NAME_OR_IP",
                   help="a DNS name or IP the server is reached by (repeatable; default: localhost and 127.0.0.1)")
    p.add_argument("--clients", type=int, default=1, metavar="N", help="client certificates and tokens to make (default 1)")
    p.add_argument("--days", type=int, default=VALID_DAYS, help=f"validity in days (default {VALID_DAYS})")
    p.add_argument("--no-tokens", action="store_true", help="do not write tokens.txt / client-J.token")
    p.add_argument("--force", action="store_true", help="replace existing files in DIR")
    p.set_defaults(func=cmd_certs)
    return p


def cmd_certs(args: argparse.Namespace) -> int:
    make_dev_certs(args.dir, hosts=tuple(args.host or DEFAULT_HOSTS), clients=args.clients,
                   tokens=not args.no_tokens, days=args.days, force=args.force)
    return 0

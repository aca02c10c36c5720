"""`efmuon worker` (also `python -m efmuon.worker`): one worker of a built-in task run."""
from __future__ import annotations

import argparse
import logging
import sys


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """The worker takes the run configuration from the server at Join, so it has only these flags."""
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="address of `efmuon server`")
    p.add_argument("--client-id", type=int, default=None, metavar="J",
                   help="client id 0..n-1 (chooses the data shard); default: the lowest free one")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="where this worker computes (default: the run configuration's device)")
    p.add_argument("--no-wire", action="store_true",
                   help="do not route the connection through the byte-counting relay (no wire figures)")
    p.add_argument("--link", metavar="PROFILE", default=None,
                   help="shape this worker's connection in its relay (in-process emulation, no root): a preset "
                        "(dsl, lte, wifi, dc-10g) or 'up=10mbit,down=50mbit,delay=20ms[,jitter=5ms,loss=0.1%%]'")
    p.add_argument("--stats", metavar="PATH.json", default=None,
                   help="write this worker's stats (bytes, transfer timings per call) as JSON when it finishes")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def cmd_worker(args: argparse.Namespace) -> int:
    from efmuon.worker.client import for_task

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    link = None
    if args.link:
        from efmuon.common.links import parse_link

        link = parse_link(args.link)
    worker = for_task(args.server, client_id=args.client_id, device=args.device, measure_wire=not args.no_wire,
                      link=link)
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


def main(argv: list[str] | None = None) -> int:
    from efmuon.common.errors import EfmuonError

    p = argparse.ArgumentParser(prog="python -m efmuon.worker", description="One efmuon worker of a built-in task.")
    add_worker_flags(p)
    args = p.parse_args(argv)
    try:
        return cmd_worker(args)
    except EfmuonError as exc:
        print(f"efmuon worker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

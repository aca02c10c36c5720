"""`efmuon worker` under torchrun (WORLD_SIZE > 1): the ranks are one client, a worker group
(efmuon.worker.group). Rank 0 reaches the server and runs the client; ranks > 0 never open a channel."""
from __future__ import annotations

import argparse

from ..common.errors import ConfigError


def cmd_group(args: argparse.Namespace, clients: list[int] | None) -> int:
    if clients is not None:
        raise ConfigError("--clients (EFMUON_CLIENTS) under torchrun (WORLD_SIZE > 1): a worker group is one "
                          "client; give --client-id J (EFMUON_CLIENT_ID), or neither for the lowest free one")
    from ..worker.group import DEFAULT_GROUP_TIMEOUT_S, Group, follow, lead, start_message

    timeout = DEFAULT_GROUP_TIMEOUT_S if args.group_timeout is None else args.group_timeout
    group = Group.from_env(timeout_s=timeout)
    group.start(args.device)  # every rank, before rank 0 reaches the server: the others wait for its word
    try:
        if group.rank != 0:
            stats = follow(group)
            if not args.quiet:
                print(f"worker group rank {group.rank}: {stats['rounds']} gradients", flush=True)
            return 0
        try:
            worker, link, status = _rank0_worker(args)
            group.send(start_message(status.config, worker.device.type))
        except BaseException as exc:
            group.abort(str(exc) or type(exc).__name__)
            raise
        from .worker import write_stats

        write_stats(args, lead(group, worker), link)
        return 0
    finally:
        group.close()


def _rank0_worker(args: argparse.Namespace):
    """The one client's Worker (rank 0), as `efmuon worker` builds it: its link, security and checkpoints."""
    from ..worker.reconnect import contact_window, reach
    from .worker import _measure_wire, security_from_args, with_config_link

    link = None
    if args.link:
        from ..common.links import parse_link

        link = parse_link(args.link)
    conn, status = reach(args.server, contact_window(args.reconnect_timeout, args.connect_timeout),
                         _measure_wire(args), link, security_from_args(args))
    try:
        conn, link = with_config_link(args, conn, status, link)
    except BaseException:
        conn.close()
        raise
    from ..worker.task import for_status

    worker = for_status(conn, status, client_id=args.client_id, device=args.device,
                        checkpoint_dir=args.checkpoint_dir, reconnect_timeout=args.reconnect_timeout,
                        connect_timeout=args.connect_timeout)
    return worker, link, status

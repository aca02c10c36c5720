"""`efmuon worker` (also `python -m efmuon.worker`): one worker of a run (a built-in task or a user's --model)."""
from __future__ import annotations

import argparse
import logging
import sys

from ..common.errors import ConfigError
from .environment import epilog, resolve, track


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """The worker takes the run configuration from the server at Join, so it has only these flags."""
    p.add_argument("--server", required=True, metavar="HOST:PORT",
                   help="address of `efmuon server`; for sharded servers (`efmuon server --shard I/N`) every shard's "
                        "address in shard order, separated by commas: HOST:P0,HOST:P1,... (the worker keeps one "
                        "session with each; docs/design.md §6.3) (required, no default: this flag or EFMUON_SERVER)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--client-id", type=int, default=None, metavar="J",
                     help="client id 0..n-1 (chooses the data shard); default: the lowest free one")
    who.add_argument("--clients", default=None, metavar="SPEC",
                     help="host several clients in this process, e.g. 0-15 or 0,3,5-7: each its own Worker, state "
                          "and connection (its own shaped link where it has one), all in threads over one shared "
                          "task, torch on 1 thread; the process fails when any client fails (the others leave). "
                          "--checkpoint-dir DIR becomes DIR/client-J, --token-file gives each client its own "
                          "token, {j} in --tls-cert/--tls-key names each client's certificate, --stats writes "
                          '{"clients": {J: stats}} (default: one client, --client-id)')
    p.add_argument("--model", metavar="MODULE:FACTORY", default=None,
                   help="the user model (module:factory) this worker expects: refused with a clear error when the "
                        "server runs another model or a built-in task (default: whatever the server runs; a --model "
                        "run's module must be importable here: the current folder counts, else PYTHONPATH)")
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
                        "(dsl, lte, wifi, dc-10g) or 'up=10mbit,down=50mbit,delay=20ms[,jitter=5ms,loss=0.1%%]' "
                        "(default: the link the run configuration gives client J: the server's --link, --link-mix, "
                        "--link-trace or [links], as `efmuon simulate` assigns them, with --client-id or "
                        "--clients; else none: unshaped)")
    p.add_argument("--stats", metavar="PATH.json", default=None,
                   help="write this worker's stats (bytes, transfer timings per call, the process's peak_rss_bytes) as "
                        "JSON when it finishes (default: none)")
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
    p.add_argument("--group-timeout", type=float, default=None, metavar="SECONDS",
                   help="a worker group (under torchrun, WORLD_SIZE > 1): how long a rank waits in one collective, "
                        "e.g. for rank 0's next round (default 86400; a rank that dies ends the group at once)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def security_from_args(args: argparse.Namespace, client_id: int | None = None):
    """Client `client_id`'s TLS/token settings (its token-file line; {j} in --tls-cert/--tls-key is its id),
    or None when none is given."""
    from ..worker.security import Security

    if args.token and args.token_file:
        raise ConfigError("give --token or --token-file, not both")
    client_id = args.client_id if client_id is None else client_id
    token = args.token
    if args.token_file:
        from ..common.wire.credentials import read_token

        token = read_token(args.token_file, client_id)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key (mutual TLS), or neither")
    if args.tls_cert and not args.tls_ca:
        raise ConfigError("--tls-cert/--tls-key (mutual TLS) need --tls-ca to trust the server")
    if not (token or args.tls_ca):
        return None
    cert, key = args.tls_cert, args.tls_key
    if cert and ("{j}" in cert or "{j}" in key):
        if client_id is None:
            raise ConfigError("{j} in --tls-cert/--tls-key stands for the client id: give --client-id or --clients")
        cert, key = cert.replace("{j}", str(client_id)), key.replace("{j}", str(client_id))
    return Security(tls_ca=args.tls_ca, tls_cert=cert, tls_key=key, token=token, insecure=args.insecure)


def _measure_wire(args: argparse.Namespace) -> bool | None:
    """--client-wire: True, --no-wire: False, neither: None (count in the relay when there is one)."""
    return True if args.client_wire else False if args.no_wire else None


def _check_flags(args: argparse.Namespace) -> list[int] | None:
    """The flags' mistakes as ConfigErrors before anything starts; the --clients ids (None: one client)."""
    from ..worker.hosting import parse_clients

    clients = parse_clients(args.clients) if args.clients is not None else None
    if args.client_id is not None and args.client_id < 0:
        raise ConfigError(f"--client-id {args.client_id} is not a client id: give 0..n-1 (n = the server's "
                          "--workers), or leave it out to be given the lowest free one")
    for flag, value in (("--reconnect-timeout", args.reconnect_timeout), ("--connect-timeout", args.connect_timeout),
                        ("--group-timeout", args.group_timeout)):
        if value is not None and not (value >= 0 and value < float("inf")):
            raise ConfigError(f"{flag} {value:g} is not a time: give seconds >= 0")
    if clients is not None and len(clients) > 1 and args.tls_cert and "{j}" not in args.tls_cert:
        raise ConfigError("--clients with --tls-cert: a client certificate names one client, so give each its own "
                          "with {j} in the paths (e.g. --tls-cert DIR/client-{j}.pem --tls-key DIR/client-{j}.key)")
    return clients


def _check_model(args: argparse.Namespace, status) -> None:
    """--model M: the server must run M (before torch loads and the module is imported)."""
    if args.model is None:
        return
    from ..common.config import check_model_spec
    from ..common.wire.protocol import decode_config

    check_model_spec(args.model)
    cfg = decode_config(status.config)
    if cfg.model != args.model.strip():
        runs = f"model {cfg.model!r}" if cfg.model else f"the built-in task {cfg.task!r}"
        raise ConfigError(f"--model {args.model!r}: the server at {args.server} runs {runs}; start this worker "
                          f"without --model (it takes the server's) or point it at the server of that model")


def write_stats(args: argparse.Namespace, stats: dict, link) -> None:
    """--stats and the summary line of one client."""
    if args.stats:
        import json

        with open(args.stats, "w") as fh:
            json.dump(_stats_of(stats, link), fh)
    if not args.quiet:
        _print_stats(stats)


def _stats_of(stats: dict, link) -> dict:
    from ..common.runtime import peak_rss_bytes

    out = {k: v for k, v in stats.items() if k != "history"}
    out["link"] = link.to_spec() if link is not None else None
    out["peak_rss_bytes"] = peak_rss_bytes()  # this process's, at the end of its run (all its clients)
    return out


def _print_stats(stats: dict) -> None:
    w = stats["wire"]
    print(f"worker {stats['client_id']}: {stats['rounds']} rounds; payload up {stats['payload']['up']} B, "
          f"down {stats['payload']['down']} B" + (f"; wire up {w['up']} B, down {w['down']} B" if w else "")
          + f"; w_sha256 {stats['w_sha256']}", flush=True)


def cmd_worker(args: argparse.Namespace) -> int:
    from ..worker.group import world_size

    resolve(args)  # EFMUON_* for every flag not on the command line
    clients = _check_flags(args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if world_size() > 1:  # under torchrun: the ranks are one client (worker.group)
        return cmd_group(args, clients)
    link = _link_of(args)
    from ..worker.connection import split_servers

    servers = split_servers(args.server)
    if len(servers) > 1:
        return _sharded(args, servers, clients, link)
    conn, status = _reach(args, link, clients[0] if clients is not None else args.client_id)
    if clients is not None:
        return _host_clients(args, clients, conn, status, link)
    worker, link = _one_worker(args, conn, status, link)
    stats = worker.run()
    write_stats(args, stats, link)
    return 0


def _link_of(args: argparse.Namespace):
    """--link PROFILE parsed (None without it)."""
    if not args.link:
        return None
    from ..common.links import parse_link

    return parse_link(args.link)


def _reach(args: argparse.Namespace, link, client: int | None):
    """(connection, Status reply) of --server, within the contact window, with `client`'s security; --model
    checked against the server's run. Closes the connection when the check fails."""
    from ..worker.reconnect import contact_window, reach

    conn, status = reach(args.server, contact_window(args.reconnect_timeout, args.connect_timeout),
                         _measure_wire(args), link, security_from_args(args, client))
    try:
        _check_model(args, status)
    except BaseException:
        conn.close()
        raise
    return conn, status


def _one_worker(args: argparse.Namespace, conn, status, link):
    """(the Worker of one client, its link): the run's link for this client where --link gives none, then the
    task's Worker with the flags' checkpoints and timeouts."""
    try:
        conn, link = with_config_link(args, conn, status, link)
    except BaseException:
        conn.close()
        raise
    # lazy: torch only once the flags are checked and the server answered, so that a wrong address, a
    # TLS mistake or a bad flag fails at once, not after the seconds torch takes to load
    from ..worker.task import for_status

    worker = for_status(conn, status, client_id=args.client_id, device=args.device,
                        checkpoint_dir=args.checkpoint_dir, reconnect_timeout=args.reconnect_timeout,
                        connect_timeout=args.connect_timeout)
    return worker, link


def _sharded(args: argparse.Namespace, servers: list[str], clients: list[int] | None, link) -> int:
    """--server HOST:P0,HOST:P1,...: sharded servers (docs/design.md §6.3). The first shard's Status gives the
    run; each client keeps one connection per shard (shaped by --link, or the run's link for client J)."""
    from ..common.wire.protocol import decode_config
    from ..worker.connection import Connection
    from ..worker.hosting import client_link, config_links
    from ..worker.reconnect import contact_window, reach

    if args.checkpoint_dir:
        raise ConfigError("--checkpoint-dir (worker checkpoints) is not supported with sharded servers yet: leave it "
                          "out (the shards' --checkpoint-every 1 keeps a resumed run exact)")
    ids = clients if clients is not None else [args.client_id]
    conn, status = reach(servers[0], contact_window(args.reconnect_timeout, args.connect_timeout),
                         _measure_wire(args), link, security_from_args(args, ids[0]))
    conns: dict = {}
    links: dict = {}
    try:
        if status.shard_count != len(servers) or status.shard_index != 0:
            said = (f"shard {status.shard_index} of {status.shard_count}" if status.shard_count > 1
                    else "a server of the whole model")
            raise ConfigError(f"--server names {len(servers)} shards, but {servers[0]} is {said}: give every shard's "
                              "address once, in shard order (shard 0 first)")
        per_client = config_links(decode_config(status.config)) if link is None else None
        for j in ids:
            links[j] = client_link(per_client, j, link) if j is not None else link
            first = conn if not conns and links[j] is link else \
                Connection(servers[0], _measure_wire(args), link=links[j], security=security_from_args(args, j))
            conns[j] = [first] + [Connection(s, _measure_wire(args), link=links[j], security=security_from_args(args, j))
                                  for s in servers[1:]]
        if all(cs[0] is not conn for cs in conns.values()):
            conn.close()
    except BaseException:
        conn.close()
        for cs in conns.values():
            for c in cs:
                c.close()
        raise
    # lazy: torch only once the flags are checked and the first shard answered
    from ..worker.hosting import run_clients
    from ..worker.task import for_shards

    workers = for_shards(conns, status, device=args.device, reconnect_timeout=args.reconnect_timeout,
                         connect_timeout=args.connect_timeout)
    if clients is None:
        stats = {None: workers[ids[0]].run()}
    else:
        stats = run_clients(workers)
    if args.stats:
        import json

        if clients is None:
            out = _stats_of(stats[None], links[ids[0]])
        else:
            out = {"clients": {str(j): _stats_of(stats[j], links[j]) for j in clients}}
        with open(args.stats, "w") as fh:
            json.dump(out, fh)
    if not args.quiet:
        for st in stats.values():
            _print_stats(st)
    return 0


def with_config_link(args: argparse.Namespace, conn, status, link):
    """(connection, link) of the one client: without --link, the link the run configuration gives client J
    (worker.hosting.config_links) on a new connection through a relay that shapes it."""
    if link is not None:
        return conn, link
    from ..common.wire.protocol import decode_config
    from ..worker.connection import Connection
    from ..worker.hosting import client_link, config_links

    links = config_links(decode_config(status.config))
    if links is None:
        return conn, None
    if args.client_id is None:
        if any(p.is_shaped for p in links):
            logging.getLogger("efmuon.worker").warning(
                "the run gives its clients links, but this worker's client id is known only once it joined: its "
                "connection is not shaped (give --client-id J, or --link)")
        return conn, None
    mine = client_link(links, args.client_id, None)
    if mine is None:
        return conn, None
    conn.close()
    return Connection(args.server, _measure_wire(args), link=mine, security=security_from_args(args)), mine


def _host_clients(args: argparse.Namespace, clients: list[int], conn, status, link) -> int:
    """--clients: one Connection per client (the first reuses the Status connection where its link is the
    same), the Workers over one shared task, run in threads (worker.hosting.run_clients)."""
    from ..common.wire.protocol import decode_config
    from ..worker.connection import Connection
    from ..worker.hosting import client_link, config_links

    conns, links = {}, {}
    try:
        per_client = config_links(decode_config(status.config)) if link is None else None
        for j in clients:
            links[j] = client_link(per_client, j, link)
            if not conns and links[j] is link:
                conns[j] = conn
            else:
                conns[j] = Connection(args.server, _measure_wire(args), link=links[j],
                                      security=security_from_args(args, j))
        if clients[0] not in conns or conns[clients[0]] is not conn:
            conn.close()
    except BaseException:
        conn.close()
        for c in conns.values():
            c.close()
        raise
    # lazy: torch only once the flags are checked and the server answered (cmd_worker)
    from ..worker.hosting import run_clients
    from ..worker.task import for_clients

    workers = for_clients(conns, status, device=args.device, checkpoint_dir=args.checkpoint_dir,
                          reconnect_timeout=args.reconnect_timeout, connect_timeout=args.connect_timeout)
    stats = run_clients(workers)
    if args.stats:
        import json

        with open(args.stats, "w") as fh:
            json.dump({"clients": {str(j): _stats_of(stats[j], links[j]) for j in clients}}, fh)
    if not args.quiet:
        for j in clients:
            _print_stats(stats[j])
    return 0


def cmd_group(args: argparse.Namespace, clients: list[int] | None) -> int:
    """`efmuon worker` under torchrun (WORLD_SIZE > 1): the ranks are one client, a worker group
    (efmuon.worker.group). Rank 0 reaches the server and runs the client; ranks > 0 never open a channel."""
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
        write_stats(args, lead(group, worker), link)
        return 0
    finally:
        group.close()


def _rank0_worker(args: argparse.Namespace):
    """The one client's Worker (rank 0), as `efmuon worker` builds it: its link, security and checkpoints."""
    link = _link_of(args)
    conn, status = _reach(args, link, args.client_id)
    worker, link = _one_worker(args, conn, status, link)
    return worker, link, status


def add_worker_parser(sub) -> None:
    p = sub.add_parser(
        "worker", help="one worker (the run configuration comes from the server)",
        description="Join a running `efmuon server`, build its built-in task and train client J's shard.")
    add_worker_flags(p)
    p.epilog = epilog(track(p))
    p.set_defaults(func=cmd_worker)

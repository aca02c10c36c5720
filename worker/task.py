"""`for_task`: the Worker of the server's task (built-in, or a user's `--model`), what `efmuon worker` runs.

The run configuration comes from the server (Status), the task, model and layer specs from
`Setup(cfg)` exactly as `efmuon simulate` builds them, so a networked run has the simulator's bits.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..common.federation import task_setup
from ..common.runtime import configure_torch
from ..common.wire import protocol
from .client import Worker
from .connection import Connection
from .reconnect import contact_window, reach

if TYPE_CHECKING:
    from ..common.links import LinkProfile
    from ..v1 import service_pb2 as pb
    from .security import Security


def for_task(server: str, client_id: int | None = None, device: str | None = None,
             measure_wire: bool | None = None, link: LinkProfile | str | None = None, security: Security | None = None,
             checkpoint_dir: str | None = None, reconnect_timeout: float = 300.0,
             connect_timeout: float | None = None) -> Worker:
    """A Worker for the server's built-in task: the config comes from the server (Status, tried for
    `reconnect.contact_window`), the task, model and layer specs from `Setup(cfg)` exactly as
    `efmuon simulate` builds them, and the batch of round k is `task.batch(client_id, k)`."""
    conn, status = reach(server, contact_window(reconnect_timeout, connect_timeout), measure_wire, link, security)
    return for_status(conn, status, client_id=client_id, device=device, checkpoint_dir=checkpoint_dir,
                      reconnect_timeout=reconnect_timeout, connect_timeout=connect_timeout)


def run_config(status: pb.StatusReply):
    """The run configuration of the server's Status reply, without the server's own outputs."""
    return protocol.decode_config(status.config).replace(report=None, metrics=None)


def for_status(conn: Connection, status: pb.StatusReply, client_id: int | None = None, device: str | None = None,
               checkpoint_dir: str | None = None, reconnect_timeout: float = 300.0,
               connect_timeout: float | None = None, task=None, threads: int | None = None) -> Worker:
    """`for_task` on a connection that already has the server's Status reply (`reconnect.reach`);
    the connection is closed when the worker cannot be built. `task`: a task built before, shared with
    other clients of this process (`for_clients`); `threads`: torch threads instead of the run's."""
    try:
        cfg = run_config(status)
        configure_torch(cfg.threads if threads is None else threads)
        setup, batch = task_setup(cfg, task=task)
    except BaseException:
        conn.close()
        raise
    return _worker(conn, cfg, setup, batch, client_id, device, checkpoint_dir, reconnect_timeout, connect_timeout,
                   configure_threads=threads is None)


def for_clients(conns: Mapping[int, Connection], status: pb.StatusReply, device: str | None = None,
                checkpoint_dir: str | None = None, reconnect_timeout: float = 300.0,
                connect_timeout: float | None = None) -> dict[int, Worker]:
    """One Worker per client j of `conns` (client j's own Connection), all in this process: the task is
    built once and shared (each client has its own Setup: model, W, state), torch runs 1 thread when
    there are several clients (they run in threads: `hosting.run_clients`), and client j checkpoints
    to `checkpoint_dir`/client-J. Every connection is closed when the workers cannot be built."""
    threads = 1 if len(conns) > 1 else None
    workers: dict[int, Worker] = {}
    try:
        cfg = run_config(status)
        configure_torch(cfg.threads if threads is None else threads)
        shared = None
        for j, conn in conns.items():  # one after another: building a model forks torch's global RNG
            setup, batch = task_setup(cfg, task=shared)
            shared = setup.task
            ckpt = os.path.join(checkpoint_dir, f"client-{j}") if checkpoint_dir else None
            workers[j] = _worker(conn, cfg, setup, batch, j, device, ckpt, reconnect_timeout, connect_timeout,
                                 configure_threads=threads is None)
    except BaseException:
        for conn in conns.values():
            conn.close()
        raise
    return workers


def _worker(conn: Connection, cfg, setup, batch, client_id, device, checkpoint_dir, reconnect_timeout,
            connect_timeout, configure_threads: bool) -> Worker:
    holder: dict = {}
    worker = Worker(setup.model, setup.task.loss, lambda k: batch(holder["w"].client_id, k), server=conn,
                    client_id=client_id, device=device or cfg.device, specs=setup.specs,
                    checkpoint_dir=checkpoint_dir, reconnect_timeout=reconnect_timeout,
                    connect_timeout=connect_timeout, configure_threads=configure_threads)
    holder["w"] = worker
    return worker


def for_shards(conns: Mapping[int | None, list[Connection]], status: pb.StatusReply, device: str | None = None,
               checkpoint_dir: str | None = None, reconnect_timeout: float = 300.0,
               connect_timeout: float | None = None) -> dict:
    """Sharded servers (docs/design.md §6.3): one `sharded.ShardedWorker` per client (key: its id, or None for
    the lowest free one), each with its connections to every shard in shard order (`conns[j]`); the run
    configuration is the first shard's Status. The task is built once; several clients run torch on 1 thread.
    Every connection is closed when the workers cannot be built."""
    from .sharded import ShardedWorker  # lazy: sharded imports torch, loaded once the servers answered

    threads = 1 if len(conns) > 1 else None
    workers: dict = {}
    try:
        cfg = run_config(status)
        configure_torch(cfg.threads if threads is None else threads)
        shared = None
        for j, cs in conns.items():
            setup, batch = task_setup(cfg, task=shared)
            shared = setup.task
            holder: dict = {}
            w = ShardedWorker(setup.model, setup.task.loss, lambda k, holder=holder, batch=batch:
                              batch(holder["w"].client_id, k), cs, cfg, setup.specs, client_id=j,
                              device=device or cfg.device, configure_threads=threads is None,
                              reconnect_timeout=reconnect_timeout, connect_timeout=connect_timeout,
                              checkpoint_dir=checkpoint_dir)
            holder["w"] = w
            workers[j] = w
    except BaseException:
        for cs in conns.values():
            for c in cs:
                c.close()
        raise
    return workers

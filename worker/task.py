"""`for_task`: the Worker of the server's built-in task, what `efmuon worker` runs.

The run configuration comes from the server (Status), the task, model and layer specs from
`Setup(cfg)` exactly as `efmuon simulate` builds them, so a networked run has the simulator's bits.
"""
from __future__ import annotations

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


def for_status(conn: Connection, status: pb.StatusReply, client_id: int | None = None, device: str | None = None,
               checkpoint_dir: str | None = None, reconnect_timeout: float = 300.0,
               connect_timeout: float | None = None) -> Worker:
    """`for_task` on a connection that already has the server's Status reply (`reconnect.reach`);
    the connection is closed when the worker cannot be built."""
    try:
        cfg = protocol.decode_config(status.config).replace(report=None, metrics=None)
        configure_torch(cfg.threads)
        setup, batch = task_setup(cfg)
    except BaseException:
        conn.close()
        raise
    task = setup.task
    holder: dict = {}
    worker = Worker(setup.model, task.loss, lambda k: batch(holder["w"].client_id, k), server=conn,
                    client_id=client_id, device=device or cfg.device, specs=setup.specs,
                    checkpoint_dir=checkpoint_dir, reconnect_timeout=reconnect_timeout,
                    connect_timeout=connect_timeout)
    holder["w"] = worker
    return worker

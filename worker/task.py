"""`for_task`: the Worker of the server's built-in task, what `efmuon worker` runs.

The run configuration comes from the server (Status), the task, model and layer specs from
`Setup(cfg)` exactly as `efmuon simulate` builds them, so a networked run has the simulator's bits.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..common.model import Setup
from ..common.runtime import configure_torch
from ..common.wire import protocol
from .client import Worker
from .connection import Connection
from .reconnect import contact, contact_window

if TYPE_CHECKING:
    from ..common.links import LinkProfile
    from .security import Security


def for_task(server: str, client_id: int | None = None, device: str | None = None,
             measure_wire: bool | None = None, link: LinkProfile | str | None = None, security: Security | None = None,
             checkpoint_dir: str | None = None, reconnect_timeout: float = 300.0) -> Worker:
    """A Worker for the server's built-in task: the config comes from the server (Status), the task,
    model and layer specs from `Setup(cfg)` exactly as `efmuon simulate` builds them, and the batch of
    round k is `task.batch(client_id, k)`."""
    conn = Connection(server, measure_wire, link=link, security=security)
    try:
        status = contact(conn, contact_window(reconnect_timeout))  # e.g. restarted while the server restarts
        cfg = protocol.decode_config(status.config).replace(report=None, metrics=None)
        configure_torch(cfg.threads)
        setup = Setup(cfg)
    except BaseException:
        conn.close()
        raise
    task = setup.task
    holder: dict = {}
    worker = Worker(setup.model, task.loss, lambda k: task.batch(holder["w"].client_id, k), server=conn,
                    client_id=client_id, device=device or cfg.device, specs=setup.specs,
                    checkpoint_dir=checkpoint_dir, reconnect_timeout=reconnect_timeout)
    holder["w"] = worker
    return worker

"""efmuon.worker: the gRPC client around common.algorithm.WorkerState, and a torch training loop.

`Worker(model, loss_fn, batches, server="host:port")` wraps any torch model; `for_task(server)`
builds the server's built-in task (what `efmuon worker` runs). `Connection` is the channel (TLS and
tokens: `security.Security`); `WorkerError` is every failure a worker reports.
"""
from .client import Worker
from .connection import Connection, WorkerError
from .task import for_task

__all__ = ["Connection", "Worker", "WorkerError", "for_task"]

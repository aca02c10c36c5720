"""efmuon.worker: the gRPC client around common.algorithm.WorkerState, and a torch training loop.

`Worker(model, loss_fn, batches, server="host:port")` wraps any torch model; `for_task(server)`
builds the server's built-in task (what `efmuon worker` runs). `Connection` is the channel (TLS and
tokens: `security.Security`); `WorkerError` is every failure a worker reports. Under torchrun the
ranks of `efmuon worker` are one client, a worker group (`group`: rank 0 the client, the others compute
their part of its batch).

`Worker` and `for_task` load on first use (PEP 562 `__getattr__`): importing the package, or its
connection, reconnect and security modules, loads no torch, so `efmuon worker` reaches its server
and names a wrong address or a TLS mistake before it spends seconds loading torch.
"""
from .connection import Connection, WorkerError, WorkerStopped

__all__ = ["Connection", "Worker", "WorkerError", "WorkerStopped", "for_task"]


def __getattr__(name: str):
    if name == "Worker":
        from .client import Worker  # lazy: torch on first use (module docstring)

        return Worker
    if name == "for_task":
        from .task import for_task  # lazy: torch on first use (module docstring)

        return for_task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

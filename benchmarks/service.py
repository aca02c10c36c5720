"""`python -m efmuon.benchmarks.service MODE JSON`: the helper processes of the service benchmarks.

The server side of `transport`, `scaling` and `memory` (and memory's workers) runs in a helper
process started from `proc.spawn`, so it has its own interpreter and its own CPU and memory
figures, as in a real deployment. MODE is one of:

    sink     transport's receiver: a grpc.aio servicer receiving like the real one, bare gRPC
             methods and a raw TCP receiver (`transport.sink_main`)
    serve    a real Coordinator + servicer for the synthetic model (`nodes.serve_main`)
    worker   a real `efmuon.worker.Worker` for it (`nodes.worker_main`)
    idle     the framework baseline (`nodes.idle_main`)
    profile-worker  a real worker of the server's task with `Worker.trace` on (`profile_nodes.worker_main`)

JSON is the helper's spec (a dict). Every helper prints one JSON line when ready or done.
"""
from __future__ import annotations

import json
import sys

from .nodes import idle_main, serve_main, worker_main
from .profile_nodes import worker_main as profile_worker_main
from .transport import sink_main

MODES = {"sink": sink_main, "serve": serve_main, "worker": worker_main, "idle": idle_main,
         "profile-worker": profile_worker_main}


def main(argv: list[str]) -> None:
    mode, spec = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    MODES[mode](spec)


if __name__ == "__main__":
    main(sys.argv[1:])

"""efmuon.worker: the gRPC client around common.algorithm.WorkerState, and a torch training loop."""

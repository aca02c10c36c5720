"""efmuon.server: the grpc.aio parameter server around common.algorithm.ServerState.

    protocol     what both ends agree on: version, chunking, limits, fingerprint, config codec
    coordinator  sessions, the synchronous round barrier, evaluation and the report (no gRPC)
    ledger       bytes per round, client, direction and level (payload / message / wire)
    service      the servicer (one Coordinator call per RPC) and serve() with graceful shutdown
    app          `efmuon server` and `efmuon run` (server here + worker processes)
    cli          the subcommands, wired into efmuon.cli

Kept import-light: `efmuon simulate` imports the CLI wiring without loading gRPC.
"""

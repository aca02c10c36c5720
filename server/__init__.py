"""efmuon.server: the grpc.aio parameter server around common.algorithm.ServerState.

    coordinator  the run: processing a complete round (aggregate, evaluate, step), stop, the report;
                 put together from
      sessions     Join (validation, the id, the reply's payload), the session check, Leave
      rounds       the round barrier: classify, accept, the deadline, replies (Phase, SubmissionKind)
      persistence  checkpoints and resuming from one
      status       the Status reply
    plan         a round's reply, cut into chunk messages once for every client
    ledger       bytes per round, client, direction and level (payload / message / wire)
    estimators   where the server keeps each client's G_j (fp32 / bf16 / disk)
    options      ServerOptions (the `efmuon server` flags) and limits; model: ServerModel
    service      the servicer (one Coordinator call per RPC) and serve() with graceful shutdown
    auth         bearer tokens and TLS credentials; certs: `efmuon certs`
    app          `efmuon server`; local: `efmuon run` (server here + worker processes); netns: shaping

The wire protocol both ends agree on lives in common.wire; the subcommands in efmuon.cli.
Kept import-light: `efmuon simulate` imports the CLI wiring without loading gRPC.
"""

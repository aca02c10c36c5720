"""efmuon.server: the grpc.aio parameter server around common.algorithm.ServerState."""

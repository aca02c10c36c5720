"""efmuon.v1: generated protobuf/gRPC code for proto/efmuon/v1/*.proto (regenerate with proto/generate.sh)."""

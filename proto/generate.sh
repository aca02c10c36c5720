#!/usr/bin/env sh
# Regenerate the Python code for proto/efmuon/v1/*.proto.
#
#   proto/generate.sh            write next to the .proto files (commit the result)
#   proto/generate.sh OUT_DIR    write into OUT_DIR/efmuon/v1/ instead (tests compare the two)
#
# The include root is proto/, so the generated imports read `from efmuon.v1 import ...` and
# resolve to the installed package efmuon.v1 with no fix-ups. Needs grpcio-tools.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
mkdir -p "$out/efmuon/v1"
cd "$here"
python -m grpc_tools.protoc -I. \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    efmuon/v1/*.proto

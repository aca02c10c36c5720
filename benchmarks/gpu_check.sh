#!/usr/bin/env bash
# The GPU checks in one run (under 8 minutes on one CUDA device): the CUDA tests, one gpt 124m round over
# gRPC with the server's LMO in bf16 on the GPU and a GPU worker, and the LMO's FLOP/s vs a plain matmul.
# Writes a JSON summary to $1 (default gpu-check.json). Without a CUDA device: one line, exit 0.
# Usage: benchmarks/gpu_check.sh [OUT.json]      (PYTHON=... picks the interpreter; default python)
# What each check does: benchmarks/gpu_check.py.
set -u
cd "$(dirname "$0")/.." || exit 1
out="${1:-gpu-check.json}"
case "$out" in /*) ;; *) out="$OLDPWD/$out" ;; esac
exec "${PYTHON:-python}" -m efmuon.benchmarks.gpu_check "$out"

"""`benchmarks/gpu_check.sh [OUT.json]` (= `python -m efmuon.benchmarks.gpu_check`): the checks that need a
CUDA device, in one short run (under 8 minutes on one GPU), with a JSON summary (default gpu-check.json).

1. `cuda_tests`: the CUDA tests (`pytest -m "cuda and not big"` over tests/test_cuda.py and tests/test_gpt.py;
   skipped where the source tree's tests/ is not present);
2. `gpt124m_round`: `efmuon run --task gpt --task-option size=124m --workers 1 --rounds 1 --device cuda` over
   gRPC on 127.0.0.1: the server's state and LMO on the GPU (Newton-Schulz in bf16 there, common.lmo) and a
   GPU worker; the report's wall time, losses and both processes' peak RSS;
3. `lmo`: the server's Newton-Schulz LMO (`lmo_all`, bf16 on CUDA) over GPT-2 124M's 48 spectral matrices,
   achieved FLOP/s vs a plain batched matmul of the same shapes (`efmuon bench lmo`'s measurement).

Without a CUDA device it prints one line saying it skipped, writes {"skipped": reason} and exits 0. Exit
status 1 when a check failed (the JSON says which)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS_S = {"cuda_tests": 240, "gpt124m_round": 240}  # with the LMO bench (< 30 s): under 8 minutes


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:] if text else ""


def _step(cmd: list[str], timeout: float, cwd: str | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out after {timeout:g} s\n" + _tail((e.stdout or b"").decode(errors="replace")
                                                                  if isinstance(e.stdout, bytes) else (e.stdout or ""))
    return {"command": " ".join(cmd), "rc": rc, "ok": rc == 0, "wall_s": round(time.perf_counter() - t0, 2),
            "output_tail": _tail(out)}


def cuda_tests() -> dict:
    tests = [os.path.join(ROOT, "tests", f) for f in ("test_cuda.py", "test_gpt.py")]
    if not all(os.path.exists(t) for t in tests):
        return {"ok": True, "skipped": f"no tests/ beside {ROOT} (not a source checkout)"}
    return _step([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "cuda and not big",
                  *tests], LIMITS_S["cuda_tests"], cwd=ROOT)


def gpt124m_round() -> dict:
    with tempfile.TemporaryDirectory(prefix="efmuon-gpu-check-") as d:
        report = os.path.join(d, "report.json")
        r = _step([sys.executable, "-m", "efmuon.cli", "run", "--task", "gpt", "--task-option", "size=124m",
                   "--workers", "1", "--rounds", "1", "--device", "cuda", "--report", report, "--plots", "none"],
                  LIMITS_S["gpt124m_round"], cwd=d)
        if os.path.exists(report):
            with open(report) as fh:
                s = json.load(fh)["summary"]
            keep = ("rounds", "wall_s", "initial_loss", "final_loss_w", "final_loss_x", "eval_loss_w",
                    "server_peak_rss_bytes", "worker_peak_rss_bytes", "w_sha256")
            r["summary"] = {k: s.get(k) for k in keep}
            r["ok"] = r["ok"] and s.get("rounds") == 1 and math.isfinite(s.get("final_loss_x") or math.nan)
        else:
            r["ok"] = False
    return r


def lmo_throughput() -> dict:
    import torch  # lazy: the skip path (no GPU) answers without loading torch

    from ..common.lmo import assign_norms  # lazy: loads torch
    from .algorithm import _gpt124m_shapes, _lmo_measure  # lazy: loads torch

    t0 = time.perf_counter()
    specs = assign_norms(_gpt124m_shapes(12))
    r = _lmo_measure(specs, torch.device("cuda"), steps=5, repeat=2, min_seconds=0.5)
    ns, mm = r["ns_flops"] / r["ns_s"], r["ns_flops"] / r["mm_equiv_s"]
    return {"ok": True, "layers": "GPT-2 124M, 12 blocks (48 spectral matrices)", "dtype": "bfloat16",
            "ns_steps": 5, "ns_TFLOPs": ns / 1e12, "matmul_TFLOPs": mm / 1e12, "x_matmul": ns / mm,
            "ns_s_per_call": r["ns_s"], "ns_batches": r["ns_calls"], "wall_s": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: benchmarks/gpu_check.sh [OUT.json]  (default gpu-check.json)", file=sys.stderr)
        return 2
    out = argv[0] if argv else "gpu-check.json"
    import torch

    if not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
        with open(out, "w") as fh:
            json.dump({"skipped": reason}, fh)
        print(f"gpu_check: skipped: {reason}")
        return 0
    t0 = time.perf_counter()
    summary: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
    for name, fn in (("cuda_tests", cuda_tests), ("gpt124m_round", gpt124m_round), ("lmo", lmo_throughput)):
        print(f"gpu_check: {name} ...", flush=True)
        try:
            summary["checks"][name] = fn()
        except Exception as e:  # one failed check does not hide the others
            summary["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        c = summary["checks"][name]
        print(f"gpu_check: {name}: {'ok' if c['ok'] else 'FAILED'}"
              + (f" ({c['wall_s']} s)" if "wall_s" in c else ""), flush=True)
    summary["ok"] = all(c["ok"] for c in summary["checks"].values())
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    with open(out, "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"gpu_check: {'ok' if summary['ok'] else 'FAILED'} in {summary['wall_s']} s; summary in {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

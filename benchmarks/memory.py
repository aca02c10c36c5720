"""`efmuon bench memory`: peak RSS of a real server process and real `Worker` processes vs model size,
minus the VmHWM of an idle process that imported the same modules (all helpers of `service`:
modes serve, worker, idle; `nodes`)."""
from __future__ import annotations

from .harness import bench, by_level, goal, table
from .proc import kill_leftovers, read_json, spawn
from .synthetic import synthetic_layers


def _memory_run(params: int, workers: int, rounds: int, uplink: str, downlink: str, trace: bool = False) -> dict:
    """VmHWM of the server and of its workers for one run; `trace`: VmRSS traces as well (at every
    Coordinator event in the server, after every step Worker.trace reports in worker 0)."""
    spec = {"params": params, "workers": workers, "rounds": rounds, "uplink": uplink, "downlink": downlink,
            "init": "grad", "instrument": trace, "rss_trace": trace}
    server = spawn("serve", spec)
    procs = []
    try:
        ready = read_json(server)
        for j in range(workers):
            procs.append(spawn("worker", {"params": params, "server": f"127.0.0.1:{ready['port']}",
                                          "client_id": j, "rss_trace": trace}))
        wres = [read_json(p) for p in procs]
        sres = read_json(server)
        for p in procs + [server]:
            p.wait(60)
    finally:
        kill_leftovers(procs + [server])
    return {"server_hwm": sres["VmHWM"], "server_ready_rss": ready["VmRSS"],
            "worker_hwm": max(w["VmHWM"] for w in wres), "rss_trace": sres["timings"].get("rss"),
            "worker_trace": wres[0].get("rss_trace"), "worker0_hwm": wres[0]["VmHWM"]}


WORKER_BOUND_COPIES = 5  # 4 model copies + the gradient (1)


def _memory_row(params: int, r: dict, idle: int, workers: int) -> dict:
    n_actual = sum(s[0] * s[1] for _, s in synthetic_layers(params))
    model = 4 * n_actual
    s_net, w_net = r["server_hwm"] - idle, r["worker_hwm"] - idle
    s_bound = (3 + workers + (workers + 1)) * model  # X W G + G_j per client + one round's frames
    w_bound = WORKER_BOUND_COPIES * model
    print(f"  {n_actual / 1e6:5.1f}M params: server {s_net / 1e6:8.1f} MB over idle ({s_net / model:.2f} "
          f"copies, bound {s_bound / model:.0f})  worker {w_net / 1e6:8.1f} MB ({w_net / model:.2f} copies, "
          f"bound {w_bound / model:.0f})",
          flush=True)
    return {"params": n_actual, "model_MB": model / 1e6, "idle_MB": idle / 1e6,
            "server_peak_MB": r["server_hwm"] / 1e6, "server_net_MB": s_net / 1e6,
            "server_copies": s_net / model, "server_bound_copies": s_bound / model,
            "worker_peak_MB": r["worker_hwm"] / 1e6, "worker_net_MB": w_net / 1e6,
            "worker_copies": w_net / model, "worker_bound_copies": w_bound / model}


def _memory_goals(rows: list[dict], workers: int) -> list[dict]:
    big = rows[-1]  # the largest model: the framework's own growth is smallest relative to it
    mid = rows[len(rows) // 2]  # 10M (4M with --quick)
    return [
        goal(f"server peak RSS over idle, in model copies (largest model; bound = 3 + n G_j + one round's "
             f"frames (n + 1) with n = {workers}, identity)", round(big["server_copies"], 2),
             f"<= {big['server_bound_copies']:.0f}", big["server_copies"] <= big["server_bound_copies"]),
        goal("worker peak RSS over idle, in model copies (largest model; bound = 4 + 1 the gradient)",
             round(big["worker_copies"], 2), f"<= {WORKER_BOUND_COPIES}", big["worker_copies"] <= WORKER_BOUND_COPIES),
        goal("server peak RSS over idle, in model copies (10M parameters)", round(mid["server_copies"], 2),
             f"<= {mid['server_bound_copies']:.0f}", mid["server_copies"] <= mid["server_bound_copies"]),
        goal("worker peak RSS over idle, in model copies (10M parameters; bound = 4 + 1 the gradient)",
             round(mid["worker_copies"], 2), f"<= {WORKER_BOUND_COPIES}", mid["worker_copies"] <= WORKER_BOUND_COPIES),
        goal("server peak RSS over idle, in model copies (smallest model)", round(rows[0]["server_copies"], 2),
             f"<= {rows[0]['server_bound_copies']:.0f}", rows[0]["server_copies"] <= rows[0]["server_bound_copies"]),
        goal("worker peak RSS over idle, in model copies (smallest model)", round(rows[0]["worker_copies"], 2),
             f"<= {WORKER_BOUND_COPIES}", rows[0]["worker_copies"] <= WORKER_BOUND_COPIES),
    ]


@bench("memory")
def bench_memory(level: str) -> dict:
    """Peak RSS of the server and a worker process vs model size, minus an idle framework process."""
    sizes = by_level(level, full=[1_000_000, 10_000_000, 50_000_000], quick=[1_000_000, 4_000_000], smoke=[300_000])
    workers, rounds = by_level(level, full=2, quick=2, smoke=1), 2
    uplink = downlink = "identity"  # the largest frames: one round's frames are (n + 1) model copies
    idle_p = spawn("idle", {})  # alongside the first run: its own peak does not depend on that
    try:
        idle, rows = None, []
        for p in sizes:
            r = _memory_run(p, workers, rounds, uplink, downlink)
            if idle is None:
                idle = read_json(idle_p)["VmHWM"]
                idle_p.wait(30)
            rows.append(_memory_row(p, r, idle, workers))
    finally:
        kill_leftovers([idle_p])
    cols = ["params", "model_MB", "idle_MB", "server_peak_MB", "server_net_MB", "server_copies",
            "server_bound_copies", "worker_peak_MB", "worker_net_MB", "worker_copies", "worker_bound_copies"]
    notes = (f"Peak RSS = VmHWM of each process at its exit (/proc/self/status). Server: the real Coordinator + "
             f"servicer for a synthetic model of spectral 256x1024 matrices, {workers} real `efmuon.worker.Worker` "
             f"processes (loss 0.5 sum p^2), {rounds} rounds, init grad, {uplink} both ways (the largest frames). "
             f"idle = VmHWM of a process that imported torch, efmuon.server.service and efmuon.worker.client and "
             f"ran one matmul (the framework baseline, subtracted). copies = (peak - idle) / (4 bytes x params). "
             f"Worker bound = 4 (W, M_j, G_j, one round's frames) + 1: the gradient autograd allocates at "
             f"backward (p.grad), the part of 'the framework's own' that scales with the model (the synthetic "
             f"loss has no activations).")
    return {"result": rows, "goals": _memory_goals(rows, workers),
            "table": notes + "\n\n" + table(rows, cols) + MEMORY_NOTES}


# From `_memory_run(10_000_000, 2, 2, "identity", "identity", trace=True)` and /proc/PID/smaps at each
# round (measured with wrappers of ServerState/Coordinator and Worker/WorkerState methods; the same
# traces now come from the Coordinator.events and Worker.trace hooks).
MEMORY_NOTES = """

Where the copies come from (RSS over idle, in model copies):
- server: X, W, G and the two G_j 5; while a round's uplinks arrive + one R_j per client (n = 2): each
  client's reassembled frames are decoded frame by frame into R_j, R_j is applied and freed in
  `apply_decoded` (a client's first G_j takes the decoded R_j over, no copy); the previous downlink's
  chunks are freed once every client has *started* its next submission (before: once n - 1 had been
  accepted, i.e. usually only at the step, one copy more during reception); the step takes the LMO in
  blocks of 1/8 of the model (`ServerState.lmo_blocks`: Newton-Schulz holds ~3.5 copies of what it
  is given) and cuts the downlink into chunks frame by frame. The peak is when both R_j are complete:
  5 + 2 = 7, plus what gRPC's C core still holds of the two streams: it reads ahead as far as its
  flow-control window, which its BDP probe grows on loopback (small heap buffers, 0.5-2 copies, varying
  from run to run with the scheduling on 2 shared cores). Back to back at 50M, the servicer with
  ("grpc.http2.bdp_probe", 0) peaked at 7.85 copies, with the default at 9.1: the remaining gap is
  that read-ahead, a transport setting (server/service.py) traded against throughput on long links.
  Four full runs of this bench gave 8.93, 9.08, 7.36, 9.05 server copies at 50M and 8.32, 7.61,
  7.48, 7.46 at 10M (workers 4.71, 4.71, 4.13, 4.12 and 4.82, 4.59, 4.58, 4.53).
- worker: W, M_j, G_j 3 (the model's parameters are views of W: `Worker._bind_model`), plus either the
  gradient 1 (handed over from p.grad, freed layer by layer in make_uplink as the uplink frames fill
  up) or, in Exchange, the uplink frames until the reply's header arrives (then freed: the server has
  applied the round) and the downlink buffer + decoded S frame by frame, plus gRPC's buffers.
- Allocator: glibc's mmap threshold is fixed at 64 KiB (`training.return_freed_memory`) for models of
  >= 16 MiB, before the model copies are allocated; `training.trim_heap` (malloc_trim) returns the heap
  pages of the caller-built model once it is dropped or bound to W, after every downlink on a worker and
  after every step on the server. The 1M row (4 MB) is below that size on purpose (on small models the
  page faults cost more time than the memory is worth; BENCHMARKS' default run); with the tuning forced
  (MALLOC_MMAP_THRESHOLD_=65536) it measured server 11.4 and worker 8.8 copies, i.e. 45 / 35 MB over
  idle of which 20-25 MB are per-process costs that do not scale with the model (gRPC channel and
  threads, the worker's relay, imports beyond the idle process's, allocator arenas).
- Changed since the previous measurement (server 8.72, worker 6.15 copies at 50M): the worker's model
  aliases W, its uplink frames are freed when the reply begins, the last downlink is released when
  every client started submitting, the LMO runs in blocks, first estimators are adopted without a
  copy, and the allocator tuning moved from >= 64 MiB / 256 KiB to >= 16 MiB / 64 KiB plus trims."""

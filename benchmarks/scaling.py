"""`efmuon bench scaling`: round time and server load vs the number of workers.

The real Coordinator + servicer for the synthetic model run in a helper process (`service` mode
serve, `nodes.serve_main`), driven by n light synthetic clients (threads here: Join, then each round
one Exchange of precomputed uplink frames, no gradient computation, or a sleep as long as a real
worker's forward + backward). What the server does is read from its `Coordinator.events` (receive,
process, reply), the split of its compute into phases from `nodes.phase_profile` after the run.
"""
from __future__ import annotations

import statistics
import threading
import time

import grpc
import torch

from ..common.lmo import available_cores, lmo_threads, ns_step_flops
from ..common.tasks import make_task
from ..common.wire import protocol
from ..v1 import service_pb2 as pb
from ..v1 import service_pb2_grpc as pb_grpc
from .harness import bench, by_level, goal, table
from .proc import kill_leftovers, read_json, spawn
from .scaling_shards import SCOLS, sharded_goals, sharded_notes, sharded_rows
from .synthetic import synthetic_layers, uplink_messages

EMULATED_CONTEXT = 256  # tokens per sequence of the emulated workers' model
EMULATED_TOKENS = 2048  # tokens per worker step the emulated workers compute (8 sequences x 256)


class _SynthClient:
    """A light client: Join (W is received and dropped), then per round one Exchange of
    precomputed Submission messages; the downlink is received and dropped.  `compute_s` > 0 emulates
    a worker on another machine: before each round's submission (rounds >= 1, after the previous
    downlink arrived) it sleeps as long as its gradient step would take, without using a core here."""

    def __init__(self, address: str, client_id: int, fingerprint, messages_for, rounds: int,
                 compute_s: float = 0.0):
        self.channel = grpc.insecure_channel(address, options=protocol.CHANNEL_OPTIONS)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.j, self.fp, self.messages_for, self.rounds = client_id, fingerprint, messages_for, rounds
        self.compute_s = compute_s
        self.error: BaseException | None = None
        self.round_times: list[float] = []

    def _join(self) -> str:
        req = pb.JoinRequest(protocol_version=protocol.PROTOCOL_VERSION, client_id=self.j,
                             parameters=self.fp, client_name=f"synthetic {self.j}")
        session = None
        for msg in self.stub.Join(req, wait_for_ready=True):
            if msg.WhichOneof("part") == "header":
                session = msg.header.session
        return session

    def _exchange(self, session: str, k: int) -> bool:
        """Round k's submission; True when the reply says the run is done."""
        h = pb.SubmissionHeader(client_id=self.j, session=session, round=k, train_loss=float("nan"))
        lengths, chunks = self.messages_for(k)
        h.frame_lengths.extend(lengths)
        t0 = time.perf_counter()
        done = False
        for msg in self.stub.Exchange(iter([pb.Submission(header=h), *chunks])):
            if msg.WhichOneof("part") == "header":
                done = msg.header.done
        self.round_times.append(time.perf_counter() - t0)
        return done

    def run(self) -> None:
        try:
            session = self._join()
            k = 0
            while True:
                if k >= 1 and self.compute_s > 0:
                    time.sleep(self.compute_s)  # the emulated forward + backward at W_k
                if self._exchange(session, k):
                    break
                k += 1
            self.stub.Leave(pb.LeaveRequest(client_id=self.j, session=session), timeout=60)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
        finally:
            self.channel.close()


def _linfit(xs, ys) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns (a, b, r^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def _recv_span(events: list, k: int) -> float:
    """Round k's uplinks: the first chunk of the first submission .. the last one reassembled."""
    ev = [(t0, t1) for r, t0, t1 in events if r == k]
    return max(t1 for _, t1 in ev) - min(t0 for t0, _ in ev) if ev else 0.0


def _run_clients(port: int, n: int, messages_for, fp, rounds: int, compute_s: float) -> None:
    clients = [_SynthClient(f"127.0.0.1:{port}", j, fp, messages_for, rounds, compute_s) for j in range(n)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [c.error for c in clients if c.error is not None]
    if errors:
        raise RuntimeError(f"synthetic client failed: {errors[0]!r}")


def _scaling_run(n: int, params: int, rounds: int, uplink: str, downlink: str, messages_for, fp,
                 compute_s: float = 0.0) -> dict:
    spec = {"params": params, "workers": n, "rounds": rounds, "uplink": uplink, "downlink": downlink,
            "init": "zero", "instrument": True, "profile": rounds - 1}
    proc = spawn("serve", spec)
    try:
        ready = read_json(proc)
        _run_clients(ready["port"], n, messages_for, fp, rounds, compute_s)
        res = read_json(proc)
        proc.wait(60)
    finally:
        kill_leftovers([proc])
    return _scaling_row(res["timings"], n, rounds, compute_s)


def _scaling_row(tm: dict, n: int, rounds: int, compute_s: float) -> dict:
    """One row from the server's events (live) and its phase profile (after the run)."""
    if not tm["process"]:
        raise RuntimeError("the server recorded no Coordinator.events ('process'): the hook is missing")
    # rounds 2..R are measured (round 0 = the empty init submission, round 1 = warm-up)
    measured = range(2, rounds + 1)
    starts, ends = {k: t0 for k, t0, _ in tm["process"]}, {k: t1 for k, _, t1 in tm["process"]}
    cpu = {k: c for k, c, _ in tm["cpu"]}
    med = statistics.median
    round_s = med([ends[k] - ends[k - 1] for k in measured])
    cpu_s = med([cpu[k] - cpu[k - 1] for k in measured])
    process = med([ends[k] - starts[k] for k in measured])
    # send: from S_k published (end of processing k-1) to the last reply of it streamed (before round k starts)
    send = med([max([t - ends[k - 1] for _, t, _ in tm["record_down"] if ends[k - 1] <= t < starts[k]],
                    default=0.0) for k in measured])
    prof = tm["profile"]
    decode, aggregate, lmo = med(prof["decode"]), med(prof["aggregate"]), med(prof["lmo"])
    phases = med([sum(v) for v in zip(*(prof[k] for k in ("decode", "aggregate", "step", "plan")))])
    busy = decode + process
    return {"workers": n, "worker_compute_s": compute_s, "rounds": len(measured), "round_s": round_s,
            "server_cpu_s": cpu_s, "recv_s": med([_recv_span(tm["recv"], k) for k in measured]),
            "decode_s": decode, "aggregate_s": aggregate,
            "decode_aggregate_s": med([d + a for d, a in zip(prof["decode"], prof["aggregate"])]), "lmo_s": lmo,
            "down_encode_s": med([s - m + p for s, m, p in zip(prof["step"], prof["lmo"], prof["plan"])]),
            "send_s": send, "process_s": process, "compute_busy_s": busy, "cpu_per_round": cpu_s / round_s,
            "busy_per_round": busy / round_s, "lmo_share": lmo / phases,
            "processed_rounds": len(tm["process"]), "replies": len(tm["record_down"]),
            "submissions": sum(1 for r, _, _ in tm["recv"] if r >= 1), "total_rounds": rounds}


def _worker_step_model(params: int) -> dict:
    """gpt-char options of a transformer with about `params` parameters (12 d^2 per block)."""
    d = 384 if params >= 5_000_000 else 128
    return {"d_model": d, "n_layers": max(1, round(params / (12 * d * d))), "n_heads": d // 64,
            "context": EMULATED_CONTEXT}


def _fastest_step(opts: dict, seqs: int, runs: int) -> tuple[float, int]:
    """The fastest of `runs` forward + backward passes (after one warm-up) and the parameter count."""
    task = make_task("gpt-char", 1, **opts, batch_size=seqs)
    model = task.build_model()
    batch = task.batch(0, 0)

    def step():
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
    step()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times), sum(p.numel() for p in model.parameters())  # shared machine: the fastest is the step's


def _measure_worker_step(params: int, runs: int = 4) -> dict:
    """A REAL forward + backward of a gpt-char transformer of ~`params` parameters in this process,
    at 1 and 4 sequences of EMULATED_CONTEXT tokens, with every core this process may use (a worker
    machine like this one, computing alone: fastest of `runs`): t(tokens) = fixed_s + tokens * per_token_s."""
    opts = _worker_step_model(params)
    before = torch.get_num_threads()
    threads = available_cores()
    torch.set_num_threads(threads)
    try:
        times = {}
        for seqs in (1, 4):
            times[seqs], n_params = _fastest_step(opts, seqs, runs)
    finally:
        torch.set_num_threads(before)
    per_token = max((times[4] - times[1]) / (3 * EMULATED_CONTEXT), 1e-12)
    fixed = max(times[1] - EMULATED_CONTEXT * per_token, 0.0)
    return {"params": n_params, "threads": threads, "per_token_s": per_token, "fixed_s": fixed,
            "seq1_s": times[1], "seq4_s": times[4], "runs": runs, **opts}


def _scaling_rows(params: int, workers: list[int], rounds: int, uplink: str, downlink: str,
                  ws: dict, compute_s: float) -> tuple[list[dict], float]:
    """Zero-compute rows for every worker count, then emulated-compute rows."""
    messages_for, fp, payload = uplink_messages(params, uplink, "zero")
    rows = []
    for emulated in (False, True):
        for n in workers:
            r = _scaling_run(n, params, rounds, uplink, downlink, messages_for, fp, compute_s if emulated else 0.0)
            r["clients"] = f"gpt step {EMULATED_TOKENS} tok" if emulated else "zero-compute"
            r["uplink_MB_per_worker"] = payload / 1e6
            # tokens per worker step at which the worker's gradient step takes as long as the server's compute
            r["break_even_tokens"] = max(0.0, (r["compute_busy_s"] - ws["fixed_s"]) / ws["per_token_s"])
            rows.append(r)
            print(f"  {r['clients']:>20s} {n:2d} workers: round {r['round_s'] * 1e3:8.1f} ms  server cpu "
                  f"{r['server_cpu_s'] * 1e3:8.1f} ms  decode+agg {r['decode_aggregate_s'] * 1e3:7.1f} ms  lmo "
                  f"{r['lmo_s'] * 1e3:7.1f} ms  busy/round {r['busy_per_round']:.2f}  break-even "
                  f"{r['break_even_tokens']:.0f} tokens", flush=True)
    return rows, payload


def _scaling_goals(rows: list[dict], ws: dict, compute_s: float) -> list[dict]:
    zero = [r for r in rows if not r["worker_compute_s"]]
    emul = [r for r in rows if r["worker_compute_s"]]
    a, b, r2 = _linfit([r["workers"] for r in zero], [r["decode_aggregate_s"] for r in zero])
    once = all(r["processed_rounds"] == r["total_rounds"] + 1 and r["replies"] == r["workers"] * (r["total_rounds"] + 1)
               for r in rows)
    one_pass = all(r["submissions"] == r["workers"] * r["total_rounds"] for r in rows)
    worst_zero = max(r["busy_per_round"] for r in zero if r["workers"] < 16)
    worst_emul = max(r["busy_per_round"] for r in emul if r["workers"] < 16)
    worst_be = max(r["break_even_tokens"] for r in zero if r["workers"] < 16)
    worst_cpu = max(r["cpu_per_round"] for r in zero if r["workers"] < 16)
    return [
        goal(f"decode + aggregate linear in workers: per-worker cost {b * 1e3:.2f} ms (intercept {a * 1e3:.1f} ms), "
             f"r^2 of the linear fit; one uplink received per client and round: {one_pass}", round(r2, 4),
             "r^2 >= 0.9, one each", r2 >= 0.9 and one_pass),
        goal("each round processed once and its reply streamed once to each client (Coordinator.events: "
             "'process' == rounds + 1, 'record_down' == workers x (rounds + 1), incl. done)", once, "True", once),
        goal(f"server compute busy time / round time below 16 workers (worst), workers emulated at a real "
             f"{ws['params'] / 1e6:.1f}M-parameter forward + backward of {EMULATED_TOKENS} tokens "
             f"({compute_s:.2f} s)", round(worst_emul, 3), "< 0.5", worst_emul < 0.5),
        goal("server compute busy time / round time below 16 workers (worst), zero-compute clients (upper bound)",
             round(worst_zero, 3), "< 0.5 (reported)", worst_zero < 0.5),
        goal("break-even worker batch below 16 workers (worst): tokens per worker step at which its forward + "
             "backward takes as long as the server's compute per round", round(worst_be), "reported", True),
        goal("server process CPU time / round time below 16 workers (worst), zero-compute clients",
             round(worst_cpu, 3), "< 0.5 (reported)", worst_cpu < 0.5),
    ]


def _scaling_notes(params: int, rounds: int, uplink: str, downlink: str, payload: int, ws: dict,
                   compute_s: float) -> str:
    layers = synthetic_layers(params)
    lmo_flops = 5 * sum(ns_step_flops(*s) for _, s in layers)
    return (f"Synthetic model: {len(layers)} spectral {layers[0][1][0]}x{layers[0][1][1]} matrices "
            f"({params / 1e6:.1f}M parameters), uplink {uplink}, downlink {downlink} ({payload / 1e6:.2f} MB uplink "
            f"per worker per round), init zero. Server: torch threads 1 (--threads), Newton-Schulz "
            f"({lmo_flops / 1e9:.0f} GFLOP per round) on lmo.lmo_threads = {lmo_threads(lmo_flops)} threads (every "
            f"core of the process: nothing else of a synchronous run computes during the server's step). The real "
            f"Coordinator + ParameterServer servicer run in a subprocess; the workers are light synthetic clients "
            f"(threads in the bench process: Join, then one Exchange per round of precomputed Submission messages, "
            f"downlink received and dropped). Two kinds of clients: 'zero-compute' (no gradient computation: the "
            f"round is server + transport only, so busy_per_round is an upper bound) and 'gpt step' = EMULATED "
            f"workers on other machines: each sleeps, per round before submitting, as long as a REAL forward + "
            f"backward of a gpt-char transformer (d_model {ws['d_model']}, {ws['n_layers']} layers, context "
            f"{EMULATED_CONTEXT}, {ws['params'] / 1e6:.2f}M parameters) takes at {EMULATED_TOKENS} tokens per step, "
            f"measured in this run in the bench process with {ws['threads']} threads (fastest of {ws['runs']} runs "
            f"each): {ws['fixed_s'] * 1e3:.1f} ms "
            f"+ {ws['per_token_s'] * 1e6:.1f} us/token (1 and 4 sequences: {ws['seq1_s']:.3f} / {ws['seq4_s']:.3f} "
            f"s) = {compute_s:.3f} s (worker_compute_s); sleeping leaves the shared cores to the server. "
            f"break_even_tokens = tokens per worker step at which that forward + backward takes as long as the "
            f"server's compute_busy_s of the row (0: even a step of a few tokens outlasts it). Medians over rounds "
            f"2..{rounds} (round 1 warms up). "
            f"Live, from the server's Coordinator.events (never by replacing product code): round_s = end of one "
            f"round's processing .. the next; recv_s = the round's first uplink chunk .. its last submission "
            f"reassembled (the uplinks stream, overlapping decode); process_s = the round's processing (aggregate, "
            f"step, downlink chunking, as the server ran them); send_s = S published .. the last client's reply "
            f"streamed. Phases, timed in the server process after its run by calling what a round calls on its "
            f"final state, {rounds - 1} times (nodes.phase_profile): decode_s = Coordinator.decode of each client's "
            f"uplink, one after another; aggregate_s = ServerState.apply_decoded; lmo_s = lmo_all of the step's "
            f"blocks; down_encode_s = ServerState.step minus LMO (steps, X/W update, C_down encode + decode) + "
            f"Plan.build (chunking, once). compute_busy_s = decode_s + process_s (the server's compute thread); "
            f"lmo_share = lmo_s / (decode + aggregate + step + Plan.build) of the profile; "
            f"busy_per_round = compute_busy_s / round_s; cpu_per_round = server process CPU (all threads incl. "
            f"gRPC) / round_s. Server 'not the bottleneck' = busy_per_round < 0.5: the workers wait on the "
            f"server's compute for less than half the round. On this 2-core machine the synthetic clients and the "
            f"server share the cores.")


@bench("scaling")
def bench_scaling(level: str) -> dict:
    """Round time and server CPU per round vs workers (synthetic clients), split into phases; once
    with zero-compute clients (upper bound) and once with clients that take as long per round as a
    real forward + backward of a model of the same size at EMULATED_TOKENS tokens, measured here."""

    params = by_level(level, full=10_485_760, quick=1 << 20, smoke=1 << 19)
    workers = by_level(level, full=[1, 2, 4, 8, 16, 32], quick=[1, 2, 4], smoke=[1])
    rounds = by_level(level, full=6, quick=3, smoke=3)
    uplink = downlink = "topk:0.1"
    ws = _measure_worker_step(params, runs=by_level(level, full=4, quick=4, smoke=1))
    compute_s = ws["fixed_s"] + EMULATED_TOKENS * ws["per_token_s"]
    print(f"  worker step (real forward + backward, gpt-char d_model {ws['d_model']} x {ws['n_layers']} layers, "
          f"{ws['params'] / 1e6:.2f}M params, {ws['threads']} threads): {ws['fixed_s'] * 1e3:.1f} ms + "
          f"{ws['per_token_s'] * 1e6:.1f} us/token -> {compute_s:.3f} s at {EMULATED_TOKENS} tokens", flush=True)
    rows, payload = _scaling_rows(params, workers, rounds, uplink, downlink, ws, compute_s)
    cols = ["clients", "workers", "worker_compute_s", "round_s", "server_cpu_s", "recv_s", "decode_s", "aggregate_s",
            "lmo_s", "down_encode_s", "send_s", "process_s", "compute_busy_s", "lmo_share", "busy_per_round",
            "cpu_per_round", "break_even_tokens", "processed_rounds", "submissions"]
    notes = _scaling_notes(params, rounds, uplink, downlink, payload, ws, compute_s)
    # the sharded column (full, quick); the smoke level leaves it to `bench scaling-shards`' own smoke run
    sharded_n = by_level(level, full=16, quick=4, smoke=2)
    counts = by_level(level, full=[1, 2, 4], quick=[1, 2, 4], smoke=[])
    sharded = sharded_rows(params, sharded_n, counts, rounds, uplink, downlink, _SynthClient, _scaling_row) \
        if counts else []
    text = notes + "\n\n" + table(rows, cols)
    if sharded:
        text += "\n\n" + sharded_notes(sharded_n, rounds) + "\n\n" + table(sharded, SCOLS)
    return {"result": rows, "sharded": sharded, "worker_step": ws, "table": text,
            "goals": _scaling_goals(rows, ws, compute_s) + (sharded_goals(sharded) if sharded else [])}


@bench("scaling-shards")
def bench_scaling_shards(level: str) -> dict:
    """The sharded column of `bench scaling` alone (benchmarks/scaling_shards.py): 1, 2, 4 shards at 16 workers."""
    params = by_level(level, full=10_485_760, quick=1 << 20, smoke=1 << 19)
    n = by_level(level, full=16, quick=4, smoke=2)
    rounds = by_level(level, full=6, quick=3, smoke=3)
    counts = by_level(level, full=[1, 2, 4], quick=[1, 2, 4], smoke=[2])  # smoke: the sharded path only
    rows = sharded_rows(params, n, counts, rounds, "topk:0.1", "topk:0.1", _SynthClient, _scaling_row)
    return {"result": rows, "goals": sharded_goals(rows),
            "table": f"Synthetic model: {params / 1e6:.1f}M parameters in spectral 256x1024 matrices, uplink and downlink "
                     f"topk:0.1, init zero (as `bench scaling`). " + sharded_notes(n, rounds) + "\n\n" + table(rows, SCOLS)}

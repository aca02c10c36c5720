"""`efmuon bench profile`: where the time of one efmuon round goes, next to where the time of one DDP step
goes: the same model, the same batches, on loopback (issue 15: a goal not met is explained with a profile).

efmuon (benchmarks.profile_nodes): a real server in this process and n real workers (processes; smoke:
threads), read only through `Coordinator.events` and `Worker.trace`, the run's default codecs. For each
round k after the warm-up (k < rounds: the last one also evaluates), per worker j, from the trace marks
(E = exchange returned, A = apply_downlink, G = gradients, U = make_uplink):

    downlink decode + apply   A_k - E_{k-1}          gradient (batch, forward, backward)   G_k - A_k
    uplink encode             U_k - G_k              Exchange of round k                    E_k - U_k, split by
    the server's events into  sending (U_k to its submission's "recv" complete), waiting for the server
    (to the end of round k's "process") and receiving the downlink (to E_k). The "recv" event names no
    client: the submissions of a round are matched to the workers in the order they began (the worker
    that began sending first is the first whose bytes arrived; any matching that keeps the order is
    valid, so sending >= 0).

and on the server: each submission's decode ("decode"), idle until the round's first submission is in
(from the previous "process" end), the barrier (first to last submission in), the aggregate ("process"
minus its "step": apply G, bookkeeping), the step that made S_k (the "step" of round k-1), split into
the LMO (Newton-Schulz) and the rest (update, downlink encode, chunking) in the proportion
`profile_nodes.step_split` measures on the final state (`lmo_fraction`).

The round's wall time: the report's `rounds[k].seconds` (the step of S_k to round k's evaluation); the
critical path inside it (from the step of S_k to the step of S_{k+1}, "step" events), consecutive
intervals: the step, publishing S_k, then the worker whose submission came in last (receiving S_k,
decode + apply, gradient, encode, sending), the last submission's decode (with its wait for the compute
thread) and the aggregate (with the ledger's bookkeeping): its compute, its transfers and the rest
(publishing). The wait for slower workers is not on it: the slowest worker is.

DDP (profile_nodes.ddp_rank): torch DDP (gloo, 127.0.0.1) with ddp_peer's model, batches and optimizers
(torch.optim.Muon + AdamW): batch, forward, backward (the bucket allreduce overlapped) and optimizer step.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

from ..common.config import RunConfig
from .harness import bench, by_level, goal, table
from .pipeline import MODELS
from .profile_nodes import DDP_PHASES, ddp_profile, efmuon_run

GOAL_RATIO = 1.2  # issue 15: on loopback an efmuon round within 1.2x a DDP step of the same model

# (phase key, row label, DDP counterpart key or None); the rows of the table, in this order
PHASES = [
    ("gradient", "worker: batch + forward + backward (gradient)", "compute"),
    ("encode", "worker: uplink encode (make_uplink)", None),
    ("sending", "worker: Exchange, sending", None),
    ("waiting", "worker: Exchange, waiting for the server", None),
    ("receiving", "worker: Exchange, receiving the downlink", None),
    ("apply", "worker: downlink decode + apply", None),
    ("decode", "server: uplink decode (each submission)", None),
    ("idle", "server: idle until the first submission", None),
    ("barrier", "server: barrier, first to last submission in", None),
    ("aggregate", "server: aggregate (apply G, bookkeeping)", None),
    ("lmo", "server: step, LMO (Newton-Schulz)", "optimizer"),
    ("update_encode", "server: step, update + downlink encode + chunking", None),
    ("crit_compute", "critical path: compute", None),
    ("crit_transfer", "critical path: transfers", None),
    ("crit_other", "critical path: the rest (publishing S_k)", None),
    ("round", "round (report rounds[k].seconds) / DDP step", "step"),
]
DDP_ROWS = [("batch", "DDP: batch"), ("forward", "DDP: forward"),
            ("backward", "DDP: backward (+ overlapped allreduce)"), ("optimizer", "DDP: optimizer step (Muon + AdamW)")]
WORKER_PHASES = ("gradient", "encode", "sending", "waiting", "receiving", "apply")


def worker_marks(trace: list) -> dict[int, dict[str, float]]:
    """{round: {step: t}} of one worker's `Worker.trace` marks: round 0 until the first apply_downlink
    (its initial submission), then each apply_downlink opens the next round."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    r = 0
    for step, t in trace:
        if step == "join":
            continue
        if step == "apply_downlink":
            r += 1
        out[r][step] = t
    return out


def per_round(events: list, traces: dict, report: dict, rounds: range) -> list[dict]:
    """Each analysed round's phases (module docstring): {round, wall_s, round_s, server: {...},
    workers: {j: {...}}, crit: {...}}."""
    ev: dict[tuple[str, int], list] = defaultdict(list)
    for what, k, t0, t1 in events:
        ev[what, k].append((t0, t1))
    secs = {r["round"]: r["seconds"] for r in report["rounds"] if r.get("seconds") is not None}
    marks = {j: worker_marks(tr) for j, tr in traces.items()}
    out = []
    for k in rounds:
        (p0, p1), = ev["process", k]
        _, prev_p1 = ev["process", k - 1][0]
        (s0, s1), = ev["step", k - 1]  # the step that made S_k
        (next_s0, _), = ev["step", k]
        step_k = ev["step", k][0][1] - next_s0
        recvs = sorted(ev["recv", k])
        starts = sorted((marks[j][k]["make_uplink"], j) for j in marks)
        if len(recvs) != len(starts):
            raise RuntimeError(f"round {k}: {len(recvs)} submissions received for {len(starts)} workers")
        got = {j: r for (_, j), r in zip(starts, recvs)}  # in the order the workers began sending
        workers = {}
        for j, m in marks.items():
            e_prev, a, g, u, e = m[k - 1]["exchange"], m[k]["apply_downlink"], m[k]["gradients"], \
                m[k]["make_uplink"], m[k]["exchange"]
            rc = got[j][1]
            workers[j] = {"apply": a - e_prev, "gradient": g - a, "encode": u - g, "sending": rc - u,
                          "waiting": p1 - rc, "receiving": e - p1, "received_s_k": e_prev - prev_p1,
                          "recv_done": rc}
        last = max(workers, key=lambda j: workers[j]["recv_done"])
        w = workers[last]
        server = {"decode": [d1 - d0 for d0, d1 in ev["decode", k]],
                  "idle": recvs[0][0] - prev_p1, "barrier": max(r[1] for r in recvs) - min(r[1] for r in recvs),
                  "aggregate": (p1 - p0) - step_k, "step": s1 - s0}
        # the critical path, consecutive intervals of [s0, next_s0]: step of S_k | publish | receiving S_k |
        # decode + apply, gradient, encode | sending | last decode (queued) | aggregate, evaluation, ledger
        compute = (s1 - s0) + (w["apply"] + w["gradient"] + w["encode"]) + (p0 - w["recv_done"]) + (next_s0 - p0)
        transfer = w["received_s_k"] + w["sending"]
        wall = next_s0 - s0
        out.append({"round": k, "wall_s": wall, "round_s": secs.get(k), "server": server,
                    "workers": {j: {p: v[p] for p in (*WORKER_PHASES, "received_s_k")} for j, v in workers.items()},
                    "crit": {"compute": compute, "transfer": transfer, "other": wall - compute - transfer,
                             "worker": last}})
    return out


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(rounds: list[dict], split: dict, ddp: dict[str, list[float]], warm: int) -> dict[str, float | None]:
    """Median seconds of every phase key of PHASES (efmuon) and of DDP's phases (after `warm` steps)."""
    med: dict[str, float | None] = {}
    for p in WORKER_PHASES:
        med[p] = _med([w[p] for r in rounds for w in r["workers"].values()])
    med["decode"] = _med([d for r in rounds for d in r["server"]["decode"]])
    for p in ("idle", "barrier", "aggregate", "step"):
        med[p] = _med([r["server"][p] for r in rounds])
    med["lmo"] = med["step"] * split["lmo_fraction"]
    med["update_encode"] = med["step"] - med["lmo"]
    for p in ("compute", "transfer", "other"):
        med[f"crit_{p}"] = _med([r["crit"][p] for r in rounds])
    med["round"] = _med([r["round_s"] for r in rounds if r["round_s"] is not None])
    med["wall"] = _med([r["wall_s"] for r in rounds])
    steps = {p: v[warm:] or v for p, v in ddp.items()}
    for p in DDP_PHASES:
        med[f"ddp_{p}"] = _med(steps[p])
    med["ddp_compute"] = _med([a + b + c for a, b, c in zip(steps["batch"], steps["forward"], steps["backward"])])
    med["ddp_step"] = _med([sum(x) for x in zip(*(steps[p] for p in DDP_PHASES))])
    return med


def rows_of(model: str, workers: int, med: dict, n_rounds: int) -> list[dict]:
    """The table's rows of one model: every efmuon phase (with its DDP counterpart) and DDP's own phases."""
    rnd = med["round"] or med["wall"]
    rows = []
    for key, label, ddp_key in PHASES:
        v = med[key]
        rows.append({"model": model, "workers": workers, "rounds": n_rounds, "phase": label, "key": key,
                     "efmuon_s": v, "share": v / rnd if (v is not None and rnd) else None,
                     "ddp_s": med.get(f"ddp_{ddp_key}") if ddp_key else None})
    for key, label in DDP_ROWS:
        rows.append({"model": model, "workers": workers, "rounds": n_rounds, "phase": label, "key": f"ddp_{key}",
                     "efmuon_s": None, "share": None, "ddp_s": med[f"ddp_{key}"]})
    return rows


def profile_model(name: str, workers: int, rounds: int, warm: int, processes: bool, ddp_steps: int,
                  options: dict | None = None, lmo_threads: int = 0) -> dict:
    """One model's profile: {model, workers, rounds, ..., med, per_round, rows}. `lmo_threads`: the run's
    --lmo-threads (0: automatic, the default)."""
    opts = dict(MODELS[name] if options is None else options)
    cfg = RunConfig(task="gpt-char", workers=workers, rounds=rounds, eval_every=rounds, task_options=dict(opts),
                    lmo_threads=lmo_threads)
    run = efmuon_run(cfg, processes)
    analysed = range(warm, rounds)
    per = per_round(run["events"], run["traces"], run["report"], analysed)
    ddp = ddp_profile(opts, workers if processes else 1, ddp_steps)
    med = summarize(per, run["split"], ddp, min(2, ddp_steps - 1))
    c = run["report"]["config"]
    summary = {"model": name, "workers": workers, "rounds": len(analysed), "uplink": c.get("uplink"),
               "downlink": c.get("downlink"), "parameters": run["report"]["summary"].get("parameters"),
               "round_s": med["round"], "ddp_step_s": med["ddp_step"],
               "round/ddp": med["round"] / med["ddp_step"] if med["round"] and med["ddp_step"] else None,
               "lmo_threads": lmo_threads or "auto", "lmo_fraction": run["split"]["lmo_fraction"],
               "workers_as": "processes" if processes else "threads", "ddp_world": workers if processes else 1}
    print(f"  {name}, {workers} workers: round {med['round']:.4f} s, DDP step {med['ddp_step']:.4f} s "
          f"({summary['round/ddp']:.2f}x); critical path: compute {med['crit_compute']:.4f} s, transfers "
          f"{med['crit_transfer']:.4f} s, rest {med['crit_other']:.4f} s", flush=True)
    return {**summary, "split": run["split"], "med": med, "per_round": per,
            "rows": rows_of(name, workers, med, len(analysed))}


SMOKE_MODEL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "context": 16, "batch_size": 4, "eval_batches": 1,
               "train_eval_batches": 1}


@bench("profile")
def bench_profile(level: str) -> dict:
    """Where an efmuon round's time goes (worker and server phases, critical path) next to a DDP step's."""
    cases = by_level(level, full=[("gpt-char", 4), ("gpt-char-d256x4", 4)], quick=[("gpt-char", 2)],
                     smoke=[("gpt-char", 2)])
    rounds, warm, ddp_steps = by_level(level, full=(13, 2, 12), quick=(8, 2, 8), smoke=(3, 1, 3))
    models = [profile_model(name, n, rounds, warm, level != "smoke", ddp_steps,
                            SMOKE_MODEL if level == "smoke" else None) for name, n in cases]
    rows = [r for m in models for r in m["rows"]]
    goals = [goal(f"{m['model']} ({m['workers']} workers, loopback): efmuon round / DDP step",
                  round(m["round/ddp"], 3), f"<= {GOAL_RATIO}", m["round/ddp"] <= GOAL_RATIO) for m in models]
    summary_cols = ["model", "workers", "rounds", "parameters", "uplink", "downlink", "round_s", "ddp_step_s",
                    "round/ddp", "lmo_threads", "workers_as", "ddp_world"]
    text = table(models, summary_cols) + "\n\n" + table(rows, ["model", "phase", "efmuon_s", "share", "ddp_s"])
    return {"result": {"models": [{k: v for k, v in m.items() if k != "rows"} for m in models], "rows": rows},
            "goals": goals, "table": text}

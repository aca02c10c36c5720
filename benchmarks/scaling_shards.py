"""The sharded column of `efmuon bench scaling`: server round time with 1, 2, 4 shard servers
(docs/design.md §6.3) at 16 workers on the synthetic model.

Each shard is a real Coordinator + servicer in its own helper process (`nodes.serve_main` with `shard`),
holding its share of the layers (`common.shards.shard_layers`). The workers are light synthetic clients
(threads here): each Joins every shard with that shard's fingerprint and, per round, sends every shard its
layers' precomputed frames at once (one thread per shard) and waits for every reply before the next round,
as `worker.sharded.ShardedWorker` does. Each shard's own Coordinator.events give its round time and busy
time; after the run the shards' phase profiles run one at a time (`profile_gate`), so they do not share the
cores with each other.

On one machine the shards share its cores, so the round time shows the overhead of sharding, not its
speed-up. With each shard on its own machine, the server's compute per round is the busiest shard's:
expected speed-up = compute busy time of the 1-shard run / the largest shard's compute busy time from its
solo phase profile (decode of the n uplinks + aggregate + step + Plan.build).
"""
from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

from ..common.lmo import assign_norms
from ..common.shards import shard_layers
from ..v1 import service_pb2 as pb
from .harness import goal
from .proc import kill_leftovers, read_json, spawn
from .synthetic import synthetic_layers, uplink_messages


SCOLS = ["shards", "workers", "round_s", "overhead_vs_1_shard", "shard_round_s", "shard_busy_s", "shard_solo_busy_s",
         "expected_speedup_own_machines", "balance_speedup", "shard_layers", "shard_params"]


PROFILE_REPEATS = 5  # each shard's solo phase profile: the fastest of this many (the machine is shared)


def _profile_busy(prof: dict) -> float:
    """A shard's solo compute per round from its phase profile: decode + aggregate + step + plan, the fastest
    repeat (other processes on a shared machine only ever slow a repeat down)."""
    return min(sum(v) for v in zip(*(prof[k] for k in ("decode", "aggregate", "step", "plan"))))


class _ShardedClient:
    """One synthetic client of a sharded run: a `_SynthClient` per shard, driven round by round together."""

    def __init__(self, parts: list):
        self.parts = parts
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            sessions = [c._join() for c in self.parts]
            with ThreadPoolExecutor(len(self.parts)) as pool:
                k = 0
                while True:
                    done = list(pool.map(lambda cs, k=k: cs[0]._exchange(cs[1], k), zip(self.parts, sessions)))
                    if all(done):
                        break
                    k += 1
            for c, s in zip(self.parts, sessions):
                c.stub.Leave(pb.LeaveRequest(client_id=c.j, session=s), timeout=60)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
        finally:
            for c in self.parts:
                c.channel.close()


def sharded_run(shards: int, n: int, params: int, rounds: int, uplink: str, downlink: str, client_cls,
                row_of) -> dict:
    """One sharded run (module docstring): `client_cls` is scaling._SynthClient, `row_of` scaling._scaling_row."""
    layers = synthetic_layers(params)
    cut = shard_layers(assign_norms(layers), shards)
    procs = []
    try:
        for i in range(shards):
            procs.append(spawn("serve", {"params": params, "workers": n, "rounds": rounds, "uplink": uplink,
                                         "downlink": downlink, "init": "zero", "instrument": True,
                                         "profile": PROFILE_REPEATS, "shard": [i, shards], "profile_gate": True},
                               stdin=subprocess.PIPE))
        ports = [read_json(p)["port"] for p in procs]
        msgs = [uplink_messages(params, uplink, "zero", cut[i]) for i in range(shards)]
        clients = [_ShardedClient([client_cls(f"127.0.0.1:{ports[i]}", j, msgs[i][1], msgs[i][0], rounds)
                                   for i in range(shards)]) for j in range(n)]
        threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [c.error for c in clients if c.error is not None]
        if errors:
            raise RuntimeError(f"synthetic client of a sharded run failed: {errors[0]!r}")
        for p in procs:
            read_json(p)  # finished
        results = []
        for p in procs:  # one profile at a time: each shard alone on the cores, as on its own machine
            p.stdin.write("go\n")
            p.stdin.flush()
            results.append(read_json(p))
            p.wait(60)
    finally:
        kill_leftovers(procs)
    rows = [row_of(r["timings"], n, rounds, 0.0) for r in results]
    solo = [_profile_busy(r["timings"]["profile"]) for r in results]
    return {"shards": shards, "workers": n, "round_s": max(r["round_s"] for r in rows),
            "shard_round_s": [round(r["round_s"], 4) for r in rows],
            "shard_busy_s": [round(r["compute_busy_s"], 4) for r in rows],
            "shard_solo_busy_s": [round(s, 4) for s in solo], "max_solo_busy_s": max(solo),
            "shard_layers": [len(c) for c in cut], "shard_params": [sum(layers[i][1][0] * layers[i][1][1] for i in c)
                                                                    for c in cut],
            "processed_rounds": min(r["processed_rounds"] for r in rows),
            "submissions": sum(r["submissions"] for r in rows)}


def sharded_rows(params: int, n: int, counts: list[int], rounds: int, uplink: str, downlink: str, client_cls,
                 row_of) -> list[dict]:
    rows = []
    for shards in counts:
        r = sharded_run(shards, n, params, rounds, uplink, downlink, client_cls, row_of)
        rows.append(r)
    base = rows[0]["max_solo_busy_s"]
    for r in rows:
        r["overhead_vs_1_shard"] = r["round_s"] / rows[0]["round_s"]
        r["expected_speedup_own_machines"] = base / r["max_solo_busy_s"]
        # within one run: the shards' solo work together / the busiest one's (no machine-wide slowdown between runs)
        r["balance_speedup"] = sum(r["shard_solo_busy_s"]) / r["max_solo_busy_s"]
        print(f"  {r['shards']} shard(s), {n} workers: round {r['round_s'] * 1e3:8.1f} ms (one machine)  busiest "
              f"shard alone {r['max_solo_busy_s'] * 1e3:8.1f} ms  expected speed-up on own machines "
              f"{r['expected_speedup_own_machines']:.2f}x (within the run: {r['balance_speedup']:.2f}x)", flush=True)
    return rows


def sharded_goals(rows: list[dict]) -> list[dict]:
    ok = all(r["processed_rounds"] == r["submissions"] // (r["workers"] * r["shards"]) + 1 for r in rows)
    best = max(rows, key=lambda r: r["expected_speedup_own_machines"])
    return [
        goal("sharded: every shard processed every round once, one uplink per client, shard and round", ok, "True", ok),
        goal(f"sharded: expected server speed-up with each shard on its own machine (1-shard compute / busiest "
             f"shard's solo compute), best at {best['shards']} shards", round(best["expected_speedup_own_machines"], 2),
             "reported (ideal: the number of shards)", True),
        goal("sharded: expected server speed-up within each run (shards' solo compute together / the busiest "
             "shard's), per shard count", {r["shards"]: round(r["balance_speedup"], 2) for r in rows},
             "reported (ideal: the number of shards)", True),
    ]


def sharded_notes(n: int, rounds: int) -> str:
    return (f"Sharded servers (docs/design.md §6.3), {n} zero-compute synthetic workers, {rounds} rounds: each shard "
            "a real Coordinator + servicer in its own process with its share of the layers (common.shards); every "
            "client exchanges with all shards at once per round and waits for all (as worker.sharded). round_s = "
            "the slowest shard's median round time, ON THIS ONE 2-CORE MACHINE: the shards and the clients share "
            "the cores, so this column shows sharding's overhead, not a speed-up. shard_busy_s = each shard's "
            "compute busy time during the run (contended); shard_solo_busy_s = each shard's phase profile "
            f"(decode of the n uplinks + aggregate + step + Plan.build; the fastest of {PROFILE_REPEATS}), run after "
            "the run one shard at a time (alone on the cores, as on a machine of its own). expected_speedup_own_machines = the 1-shard solo "
            "busy time / the busiest shard's solo busy time: the server's compute per round with each shard on "
            "its own machine of this kind (the transport then runs on N network links in parallel too). It compares "
            "runs minutes apart, so a shared machine's load between them moves it; balance_speedup = the sum of the "
            "run's shards' solo busy times / the busiest one's (every layer's work is done once, by one shard): the "
            "same expectation from within one run, less exposed to the load between runs, more to a single noisy "
            "profile.")


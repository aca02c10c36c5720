"""`efmuon bench peers`: the head-to-head with torch's own distributed training (issue 15, item 4).

The same built-in model (gpt-char), init and batches, trained
  * by DDP (gloo) with torch.optim.Muon on the blocks' matrices and AdamW on the rest
    (`benchmarks.ddp_peer`), its gradients exchanged by fp32 allreduce, the fp16 hook or PowerSGD
    rank 8 / 16 (torch.distributed's hooks; `batched_powerSGD_hook` fails on torch 2.13: `ddp_peer probe`);
  * by efmuon (`efmuon run --shaping netns`), its default compressors and identity both ways;
every host behind the same tc tbf (up and down) in its own network namespace: the DDP ranks in namespaces
this benchmark makes (`server.netns.Star`, every address private to them, deleted in a finally block),
efmuon's server and workers in `efmuon run`'s (`--link L --server-link L`: the server's own link too).

Both sides run a constant lr, evaluate the validation loss every `eval_every` steps / rounds and count to the
first evaluation at or below the target:
  * time to target: training seconds up to it (DDP: rank 0's steps: batch, forward, backward with the
    exchange, optimizer step; efmuon: the report's round seconds, the server's step to the round's last
    aggregation). Excluded on both sides: process start-up, rendezvous / join (DDP's initial broadcast,
    efmuon's initial W and gradient), and the evaluations;
  * steps (rounds) to target;
  * wire MB per worker: Ethernet frames both ways, start-up included (DDP: each rank's veth counters, mean
    over ranks; efmuon: the tc counters of the server's link / workers; efmuon's own TCP-level count is
    `efmuon_wire_MB`).
efmuon runs exactly the rounds to the target: `efmuon simulate`'s arithmetic (the networked run's, bit for
bit; `sim_round`) finds the round first, in process, and the networked run's validation loss at it is checked
against it (`same_as_sim`). Repeats are interleaved (repeat r runs every setting and variant, in reversed
order on odd r) and rows report the median.
The suite's smoke level launches its DDP variants together, one after the other on one process group
(`ddp_peer.rank_main` with several hooks: one start-up); every other level gives each run its own launch.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from ..common.config import DEFAULT_DOWNLINK, DEFAULT_UPLINK, RunConfig
from ..common.links import parse_link
from ..common.model import evaluate
from ..common.tasks.gptchar import GptCharTask
from ..server.netns import NetnsError, Star, check_available, client_addr
from ..simulate.sync import SyncSim
from . import ddp_peer
from .harness import bench, by_level, goal, table

CLI = [sys.executable, "-m", "efmuon.cli"]
DDP_VARIANTS = [f"ddp {h}" for h in ddp_peer.HOOKS]
EFMUON_VARIANTS = {"efmuon default": (DEFAULT_UPLINK, DEFAULT_DOWNLINK), "efmuon identity": ("identity", "identity")}
VARIANTS = DDP_VARIANTS + list(EFMUON_VARIANTS)
PORT = 29500  # gloo's rendezvous on rank 0, inside the benchmark's own namespaces
RUN_TIMEOUT = 900.0
# ddp_peer's entry point (not `-m efmuon.benchmarks.ddp_peer`: the package has imported it already, runpy would warn)
DDP_ENTRY = [sys.executable, "-c", "import sys; from efmuon.benchmarks.ddp_peer import main; sys.exit(main(sys.argv[1:]))"]


def skip_reason() -> str | None:
    """Why this machine cannot run the benchmark (needs root and `ip netns`), or None."""
    try:
        check_available()
    except NetnsError as exc:
        return str(exc).replace("--shaping netns", "efmuon bench peers")
    return None


def level_setup(level: str) -> dict:
    return by_level(
        level,
        full={"workers": 4, "target": 1.90, "eval_every": 5, "max_steps": 300, "repeats": 2,
              "settings": [("20 Mbit/s", "up=20mbit,down=20mbit"), ("100 Mbit/s", "up=100mbit,down=100mbit"),
                           ("1 Gbit/s (fast)", "up=1gbit,down=1gbit")], "task_options": {}},
        quick={"workers": 2, "target": 2.60, "eval_every": 5, "max_steps": 100, "repeats": 1,
               "settings": [("20 Mbit/s", "up=20mbit,down=20mbit"), ("100 Mbit/s", "up=100mbit,down=100mbit")],
               "task_options": {}},
        smoke={"workers": 2, "target": 4.20, "eval_every": 2, "max_steps": 6, "repeats": 1,
               "settings": [("100 Mbit/s", "up=100mbit,down=100mbit")],
               "task_options": {"d_model": 32, "context": 32, "batch_size": 8},
               # the suite's run: each hook's path once (PowerSGD at one rank) and efmuon's default
               "variants": ["ddp fp32", "ddp fp16", "ddp powersgd-r8", "efmuon default"]})


# ------------------------------------------------------------------------------------------- efmuon
def _efmuon_cfg(setup: dict, uplink: str, downlink: str, rounds: int, **extra) -> RunConfig:
    return RunConfig(**{"task": "gpt-char", "task_options": dict(setup["task_options"]), "workers": setup["workers"],
                        "rounds": rounds, "eval_every": setup["eval_every"], "schedule": "constant",
                        "uplink": uplink, "downlink": downlink, "threads": 1, "seed": 0, **extra})


def sim_rounds_to_target(args: tuple) -> dict:
    """In process (efmuon simulate's SyncSim, the networked run's arithmetic): the first evaluated round whose
    validation loss is <= target, or the cap. {round, val_loss, reached, up_MB_per_worker, down_MB_per_worker}:
    the payload per worker up to that round, the join phase included (as `efmuon simulate`'s report counts it).
    `args`: (setup, uplink, downlink) or (setup, uplink, downlink, {RunConfig key: value} over peers' settings)."""
    setup, uplink, downlink, *more = args
    torch.set_num_threads(1)
    cap, every, target = setup["max_steps"], setup["eval_every"], setup["target"]
    sim = SyncSim(_efmuon_cfg(setup, uplink, downlink, cap, **(more[0] if more else {})))
    sim.join()

    def result(k: int, val, reached: bool) -> dict:
        mb = {d: sum(c[d]["payload"] for c in sim.per_client.values()) / sim.n / 1e6 for d in ("up", "down")}
        return {"round": k, "val_loss": val, "reached": reached, "up_MB_per_worker": mb["up"],
                "down_MB_per_worker": mb["down"]}

    val = None
    for k in range(1, cap + 1):
        sim.round(k)
        if k % every == 0 or k == cap:
            val = evaluate(sim.eval_model, sim.server.W, sim.task.eval_loss)
            if val <= target:
                return result(k, val, True)
    return result(cap, val, False)


def sims_to_target(jobs: list[tuple], in_process: bool) -> list[dict]:
    """`sim_rounds_to_target` of each job: here, one after the other (a few rounds of a tiny model, cheaper than
    starting processes; this process's torch threads put back after), or two at a time in child processes
    (a run is one core's work)."""
    if in_process:
        threads = torch.get_num_threads()
        try:
            return [sim_rounds_to_target(job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    with mp.get_context("spawn").Pool(2) as pool:
        return pool.map(sim_rounds_to_target, jobs, chunksize=1)


def efmuon_args(setup: dict, uplink: str, downlink: str, rounds: int, link: str) -> list[str]:
    args = ["run", "--task", "gpt-char", "--workers", str(setup["workers"]), "--rounds", str(rounds),
            "--eval-every", str(setup["eval_every"]), "--schedule", "constant", "--uplink", uplink,
            "--downlink", downlink, "--seed", "0", "--threads", "1", "--shaping", "netns", "--link", link,
            "--server-link", link, "--plots", "none"]
    for k, v in setup["task_options"].items():
        args += ["--task-option", f"{k}={v}"]
    return args


def run_efmuon(setup: dict, variant: str, link: str, sim: dict, tmp: str) -> dict:
    uplink, downlink = EFMUON_VARIANTS[variant]
    report = os.path.join(tmp, "efmuon.json")
    t0 = time.perf_counter()
    p = subprocess.run(CLI + efmuon_args(setup, uplink, downlink, sim["round"], link) + ["--report", report],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{variant}: efmuon run failed (rc {p.returncode}): {p.stdout[-1500:]} {p.stderr[-2500:]}")
    with open(report) as fh:
        rep = json.load(fh)
    s, n = rep["summary"], setup["workers"]
    rounds = rep["rounds"]
    last = rounds[-1]
    tc = {d: ((s.get("server_link") or {}).get(d) or {}).get("tc") or {} for d in ("up", "down")}
    link_bytes = sum(tc[d].get("sent_bytes") or 0 for d in ("up", "down"))
    return {"system": "efmuon", "variant": variant, "reached": sim["reached"],
            "steps_to_target": last["round"] if sim["reached"] else None,
            "time_to_target_s": sum(r["seconds"] for r in rounds) if sim["reached"] else None,
            "train_s": sum(r["seconds"] for r in rounds), "steps": last["round"],
            "val_loss": last.get("val_loss_w"), "same_as_sim": last.get("val_loss_w") == sim["val_loss"],
            "wire_MB_per_worker": link_bytes / n / 1e6,
            "efmuon_wire_MB": sum(s["bytes"][d]["wire"] or 0 for d in ("up", "down")) / n / 1e6,
            "payload_MB_per_worker": sum(s["bytes"][d]["payload"] or 0 for d in ("up", "down")) / n / 1e6,
            "run_wall_s": wall, "mechanism": (s.get("server_link") or {}).get("mechanism")}


# ------------------------------------------------------------------------------------------- DDP
def run_ddp(setup: dict, variants: list[str], link: str, tmp: str, probe: bool = False) -> list[dict]:
    """DDP runs, one per variant, by one launch of the ranks (one process group; the smoke level's several
    variants share its start-up): their own star of namespaces (one per rank, every rank's link shaped both
    ways), ranks started with `ip netns exec`, the namespaces deleted at the end whatever happens. `probe`:
    rank 0 probes batched_powerSGD_hook at the end; the first row then has "batched_powerSGD_hook_error"."""
    hooks, n = [v.split(" ", 1)[1] for v in variants], setup["workers"]
    what = ", ".join(variants)
    profile = parse_link(link)
    star = Star(n)
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    try:
        star.up()
        for j in range(n):
            star.shape(j, profile, netem=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"}
        for j in range(n):
            spec = {"rank": j, "world": n, "master": client_addr(0), "port": PORT, "hooks": hooks, "task": "gpt-char",
                    "task_options": setup["task_options"], "seed": 0, "eval_every": setup["eval_every"],
                    "target": setup["target"], "max_steps": setup["max_steps"], "dev": "eth0", "probe": probe,
                    "out": os.path.join(tmp, f"rank{j}.json")}
            path = os.path.join(tmp, f"spec{j}.json")
            with open(path, "w") as fh:
                json.dump(spec, fh)
            with open(os.path.join(tmp, f"rank{j}.log"), "w") as log:  # a file, not a pipe: no rank blocks on it
                procs.append(subprocess.Popen(star.exec_prefix(star.clients[j]) + DDP_ENTRY + ["rank", path],
                                              env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + RUN_TIMEOUT * len(variants)
        for j, p in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{what}: rank {j} still running after {RUN_TIMEOUT * len(variants):.0f} s") from None
        failed = {j: open(os.path.join(tmp, f"rank{j}.log")).read()[-2000:] for j, p in enumerate(procs)
                  if p.returncode != 0}
        if failed:
            raise RuntimeError(f"{what}: DDP rank(s) failed: {failed}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        star.down()
    wall = time.perf_counter() - t0
    ranks = []
    for j in range(n):
        with open(os.path.join(tmp, f"rank{j}.json")) as fh:
            ranks.append(json.load(fh))
    rows = []
    for i, variant in enumerate(variants):
        runs = [r["runs"][i] for r in ranks]
        ev0 = runs[0]["evals"][-1]
        reached = ev0["val_loss"] <= setup["target"]
        at = [r["evals"][-1] for r in runs]
        rows.append({"system": "ddp", "variant": variant, "reached": reached,
                     "steps_to_target": ev0["step"] if reached else None,
                     "time_to_target_s": ev0["train_s"] if reached else None, "train_s": ev0["train_s"],
                     "steps": ev0["step"], "val_loss": ev0["val_loss"], "same_as_sim": None,
                     "wire_MB_per_worker": statistics.mean(e["bytes"] for e in at) / 1e6,
                     "max_rank_wire_MB": max(e["bytes"] for e in at) / 1e6,
                     "start_MB_per_worker": statistics.mean(r["start_bytes"] for r in runs) / 1e6,
                     "run_wall_s": wall / len(variants), "mechanism": "tbf",
                     **({"launch": what} if len(variants) > 1 else {})})
    if probe:
        rows[0]["batched_powerSGD_hook_error"] = ranks[0]["batched_powerSGD_hook_error"]
    return rows


# ------------------------------------------------------------------------------------------- the bench
def _median_rows(runs: list[dict], settings: list) -> list[dict]:
    rows = []
    for label, link in settings:
        for variant in VARIANTS:
            mine = [r for r in runs if r["setting"] == label and r["variant"] == variant]
            if not mine:
                continue
            row = {"setting": label, "variant": variant, "repeats": len(mine),
                   "reached": all(r["reached"] for r in mine)}
            for k in ("steps_to_target", "time_to_target_s", "wire_MB_per_worker", "efmuon_wire_MB",
                      "payload_MB_per_worker", "val_loss", "train_s", "run_wall_s"):
                vals = [r[k] for r in mine if r.get(k) is not None]
                row[k] = statistics.median(vals) if vals and len(vals) == len(mine) else None
            row["same_as_sim"] = (all(r["same_as_sim"] for r in mine) if mine[0]["system"] == "efmuon" else None)
            rows.append(row)
    return rows


def ratios(rows: list[dict], settings: list) -> dict:
    """Per setting: the best DDP variant (least time to target) and efmuon default's time and bytes against it."""
    out = {}
    for label, _ in settings:
        ddp = [r for r in rows if r["setting"] == label and r["variant"].startswith("ddp")
               and r["time_to_target_s"] is not None]
        efm = next((r for r in rows if r["setting"] == label and r["variant"] == "efmuon default"), None)
        if not ddp or efm is None or efm["time_to_target_s"] is None:
            out[label] = None
            continue
        best = min(ddp, key=lambda r: r["time_to_target_s"])
        least = min(ddp, key=lambda r: r["wire_MB_per_worker"])
        out[label] = {"best_ddp": best["variant"], "time_x": efm["time_to_target_s"] / best["time_to_target_s"],
                      "bytes_x": efm["wire_MB_per_worker"] / best["wire_MB_per_worker"],
                      "least_bytes_ddp": least["variant"],
                      "bytes_x_least": efm["wire_MB_per_worker"] / least["wire_MB_per_worker"]}
    return out


def _skipped(reason: str) -> dict:
    return {"result": {"skipped": reason}, "goals": [], "skipped": reason,
            "table": f"skipped: {reason}"}


@bench("peers")
def bench_peers(level: str) -> dict:
    """DDP (fp32, fp16, PowerSGD r8/r16; torch Muon + AdamW) vs efmuon, every host behind tc tbf in a netns."""
    reason = skip_reason()
    if reason:
        print(f"  skipped: {reason}", flush=True)
        return _skipped(reason)
    setup = level_setup(level)
    variants = setup.get("variants", VARIANTS)
    jobs = [(setup, up, down) for up, down in EFMUON_VARIANTS.values()]
    sims = dict(zip(EFMUON_VARIANTS, sims_to_target(jobs, in_process=level == "smoke")))
    for v, s in sims.items():
        print(f"  {v}: validation loss {s['val_loss']:.4f} at round {s['round']} in simulate "
              f"({'target reached' if s['reached'] else 'target NOT reached'})", flush=True)
    # the smoke level launches its DDP variants together (one start-up); otherwise each its own launch, so
    # every run starts from a fresh interpreter, as the efmuon runs do
    together = level == "smoke"
    batched = None  # batched_powerSGD_hook's error, from rank 0 of the first DDP launch
    runs = []
    with tempfile.TemporaryDirectory(prefix="efmuon-bench-peers-") as tmp:
        for rep in range(setup["repeats"]):
            order = variants if rep % 2 == 0 else variants[::-1]
            if together:
                ddp = [v for v in order if v not in EFMUON_VARIANTS]
                launches = [[v] for v in order if v in EFMUON_VARIANTS] + ([ddp] if ddp else [])
            else:
                launches = [[v] for v in order]
            for label, link in setup["settings"]:
                for launch in launches:
                    sub = tempfile.mkdtemp(dir=tmp)
                    if launch[0] in EFMUON_VARIANTS:
                        got = [run_efmuon(setup, launch[0], link, sims[launch[0]], sub)]
                    else:
                        got = run_ddp(setup, launch, link, sub, probe=batched is None)
                        if batched is None:
                            batched = got[0].pop("batched_powerSGD_hook_error")
                            print(f"  batched_powerSGD_hook on torch: {batched or 'works'}", flush=True)
                    for r in got:
                        r.update(setting=label, link=link, repeat=rep)
                        runs.append(r)
                        tt = r["time_to_target_s"]
                        print(f"  [{rep}] {label:16s} {r['variant']:18s} steps {r['steps']:>4} val {r['val_loss']:.4f} "
                              f"to target {'-' if tt is None else f'{tt:.1f} s'}  {r['wire_MB_per_worker']:.2f} "
                              f"MB/worker (run {r['run_wall_s']:.0f} s)", flush=True)
    if batched is None:  # no DDP variant ran: probe on its own
        probe = subprocess.run(DDP_ENTRY + ["probe"], capture_output=True, text=True, timeout=120)
        batched = json.loads(probe.stdout.strip().splitlines()[-1])["batched_powerSGD_hook_error"] \
            if probe.returncode == 0 and probe.stdout.strip() else f"probe failed: {probe.stderr[-500:]}"
    rows = _median_rows(runs, setup["settings"])
    rat = ratios(rows, setup["settings"])
    goals = []
    for label, tmax, bmax in (("20 Mbit/s", 0.5, 0.2), ("100 Mbit/s", 1.0, None)):
        if label not in rat:
            continue
        r = rat[label]
        goals.append(goal(f"{label}: efmuon default's time to target / the best DDP variant's",
                          r and round(r["time_x"], 3), f"<= {tmax}", bool(r and r["time_x"] <= tmax)))
        if bmax is not None:
            goals.append(goal(f"{label}: efmuon default's wire bytes per worker to target / the best DDP variant's",
                              r and round(r["bytes_x"], 3), f"<= {bmax}", bool(r and r["bytes_x"] <= bmax)))
    cols = ["setting", "variant", "repeats", "reached", "steps_to_target", "time_to_target_s", "wire_MB_per_worker",
            "efmuon_wire_MB", "val_loss", "same_as_sim", "run_wall_s"]
    rat_rows = [{"setting": k, **(v or {})} for k, v in rat.items()]
    rat_table = table(rat_rows, ["setting", "best_ddp", "time_x", "bytes_x", "least_bytes_ddp", "bytes_x_least"])
    notes = (f"gpt-char ({setup['task_options'] or 'default options'}), {setup['workers']} workers, seed 0, the same "
             f"init and batches on both sides; target validation loss **{setup['target']}**, evaluated every "
             f"{setup['eval_every']} steps / rounds (cap {setup['max_steps']}); {setup['repeats']} interleaved "
             f"repeat(s), medians. Every host (efmuon's server included) in its own network namespace behind tc tbf "
             f"at the setting's rate both ways. DDP: gloo, torch.optim.Muon (lr {ddp_peer.MUON_LR}, momentum "
             f"{ddp_peer.MUON_MOMENTUM}, nesterov) on the blocks' matrices + AdamW (lr {ddp_peer.ADAMW_LR}, betas "
             f"{ddp_peer.ADAMW_BETAS}) on embeddings and head, constant lr, no weight decay; PowerSGD: "
             f"start_powerSGD_iter {ddp_peer.POWERSGD_START}, error feedback, warm start. efmuon: the task's lr "
             f"{GptCharTask.defaults['lr']} / beta {GptCharTask.defaults['beta']}, constant; default = {DEFAULT_UPLINK} up / {DEFAULT_DOWNLINK} down. "
             f"`batched_powerSGD_hook`: {batched or 'works'} (not benchmarked). time_to_target_s: training "
             f"seconds, start-up, join/rendezvous and evaluations excluded (module docstring of "
             f"benchmarks/peers.py). wire_MB_per_worker: Ethernet frames both ways to the target, start-up "
             f"included (DDP: each rank's veth counters, mean; efmuon: the server link's tc counters / workers); "
             f"efmuon_wire_MB: efmuon's own count (TCP payload). same_as_sim: the networked run's validation loss "
             f"at the target round equals simulate's.")
    return {"result": {"rows": rows, "runs": runs, "ratios": rat, "simulate": sims, "setup": setup,
                       "batched_powerSGD_hook_error": batched},
            "goals": goals, "table": notes + "\n\n" + table(rows, cols) + "\n\nRatios (efmuon default / DDP):\n\n"
            + rat_table}

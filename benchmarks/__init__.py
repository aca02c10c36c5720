"""efmuon.benchmarks: every `efmuon bench NAME`, outside the installed server package.

    harness     the registry (`@bench`), levels (full / quick / smoke), timing, tables, goals, the
                BENCHMARKS.md sections
    algorithm   bytes to a target loss, methods, codecs, Newton-Schulz / LMO throughput (no transport)
    transport   transport goodput: the worker's chunk path vs raw TCP (its receiver: a helper process)
    scaling     server round time and load vs workers (real Coordinator, synthetic clients)
    scaling_shards  the sharded column of scaling (1, 2, 4 shard servers; also alone: `bench scaling-shards`)
    memory      peak RSS of real server and worker processes vs model size
    bytes_gpt   the bytes headline on the 10.8M-parameter GPT (`bench bytes-10m`)
    bytes_wire  payload vs wire bytes of a real networked run (run_local)
    soak        many workers over many rounds: does the server's memory stay flat?
    robustness  final validation loss vs lr for muon, muonmax, muonmax-momo (arXiv 2510.09827 in small)
    moe         Muon vs the adamw preset on gpt-moe (MLA + MoE): rounds to the same validation loss
    peers       the head-to-head with torch DDP (fp32, fp16, PowerSGD hooks; torch Muon + AdamW), every host
                behind tc tbf in its own network namespace: time, steps and wire bytes to a validation loss
    ddp_peer    one DDP rank of `peers` (`python -m efmuon.benchmarks.ddp_peer rank SPEC.json`), the
                batched_powerSGD_hook probe and the lr sweep
    pipeline    round time with and without --pipeline (run_local), and a DDP (gloo) step of the same model
    profile     where an efmuon round's time goes (worker / server phases, critical path) next to a DDP step's
    profile_nodes  its traced run (server here, workers as processes or threads) and its DDP ranks
    rounds      gpt-char rounds and payload bytes to peers' target per variant (pairing, lr, beta, per-layer
                rule) vs the default pairing and identity (issue 15, item 3)
  and what the service benchmarks share:
    synthetic   the synthetic model (spectral 256x1024 matrices), its config and uplink frames
    proc        starting helper processes, reading their JSON, /proc memory and CPU figures
    nodes       the real server / worker / idle helper processes on the synthetic model
    service     the helpers' entry point: `python -m efmuon.benchmarks.service MODE JSON`

Benchmarks time production code only through its explicit hooks (`Coordinator.events`, `Worker.trace`)
or by calling its functions directly, never by replacing its classes or methods.
"""
from __future__ import annotations

import json

from ..common.errors import ConfigError
from . import algorithm, bytes_gpt, bytes_wire, federation, memory, moe, peers, pipeline, profile, robustness, rounds, scaling, scaling_shards, soak, startup, transport  # noqa: F401 - importing them registers their benchmarks
from .harness import BENCHES, machine, update_markdown


def run_bench(name: str, quick: bool, report: str | None, markdown: str | None, command: str,
              smoke: bool = False) -> dict:
    """Run benchmark `name` (`quick`: --quick; `smoke`: the test suite's tiny setting, implies quick),
    print its table and goals, and write the JSON report and/or the BENCHMARKS.md section."""
    if name not in BENCHES:

        raise ConfigError(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHES))}")
    level = "smoke" if smoke else "quick" if quick else "full"
    tag = {"smoke": " (smoke)", "quick": " (quick)", "full": ""}[level]
    print(f"bench {name}{tag}: {BENCHES[name].__doc__.strip().splitlines()[0]}", flush=True)
    out = BENCHES[name](level)
    out = {"bench": name, "quick": quick or smoke, **({"smoke": True} if smoke else {}), "machine": machine(),
           "command": command, **out}
    print(out["table"])
    for g in out["goals"]:
        print(f"goal: {g['name']}: {g['value']} (goal {g['goal']}) -> {'met' if g['met'] else 'NOT met'}")
    if report:
        with open(report, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    if markdown:
        goals = "\n".join(f"- {g['name']}: **{g['value']}** (goal {g['goal']}: {'met' if g['met'] else 'not met'})"
                          for g in out["goals"])
        update_markdown(markdown, name, command, out["table"] + ("\n\n" + goals if goals else ""))
    return out

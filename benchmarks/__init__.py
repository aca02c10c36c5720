"""efmuon.benchmarks: every `efmuon bench NAME`, outside the installed server package.

    harness    the registry (`@bench`), timing, tables, goals, the BENCHMARKS.md sections
    algorithm  bytes to a target loss, methods, codecs, Newton-Schulz / LMO throughput (no transport)
    service    transport goodput, server scaling, memory, bytes on the wire (real gRPC processes)
    soak       many workers over many rounds: does the server's memory stay flat?

Benchmarks time production code only through its explicit hooks (`Coordinator.events`, `Worker.trace`),
never by replacing its classes or methods.
"""
from __future__ import annotations

import json

from ..common.errors import ConfigError
from . import algorithm, service, soak  # noqa: F401 - importing them registers their benchmarks
from .harness import BENCHES, machine, update_markdown


def run_bench(name: str, quick: bool, report: str | None, markdown: str | None, command: str) -> dict:
    if name not in BENCHES:

        raise ConfigError(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHES))}")
    print(f"bench {name}{' (quick)' if quick else ''}: {BENCHES[name].__doc__.strip().splitlines()[0]}", flush=True)
    out = BENCHES[name](quick)
    out = {"bench": name, "quick": quick, "machine": machine(), "command": command, **out}
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

"""`efmuon run --shards N`: N shard servers (docs/design.md §6.3) in this process, each on its own port of
127.0.0.1 with its own Coordinator (its own compute thread and event-loop tasks), and the local worker
processes, each given every shard's address (`efmuon worker --server 127.0.0.1:P0,127.0.0.1:P1,...`).

The task is built once for all shards (`federation.task_setup`), so each Coordinator takes its layers from
the same X_0. Shard I writes its report to REPORT.shardI.json (with its layers file beside it) and, with
--checkpoint-dir DIR, its checkpoints to DIR/shard-I (resume one shard with `efmuon server --shard I/N
--resume DIR/shard-I`; `efmuon run --shards` itself does not resume). Once the run is over the shards'
reports are merged into REPORT (common.shardmerge), with the plots of the merged report.

On one machine the shards share its cores: this shows the protocol's overhead, not the speed-up that
shards on separate machines give (BENCHMARKS.md, scaling).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys

from ..common.config import RunConfig
from ..common.errors import ConfigError
from ..common.federation import has_links, task_setup
from ..common.outputs import plots_dir
from ..common.shardmerge import merge_reports
from ..common.shards import check_shardable, parse_shard_count
from .app import build_coordinator
from .local import CLIENTS_PER_PROCESS, LocalWorkers, _on_term, worker_env
from .options import ServerOptions
from .service import serve
from .spawn import ForkServer, spawn_mode

__all__ = ["run_sharded", "shard_report_path"]


def shard_report_path(report: str, index: int) -> str:
    """REPORT.json -> REPORT.shardI.json (where shard I of `efmuon run --shards` writes its report)."""
    stem, ext = os.path.splitext(report)
    return f"{stem}.shard{index}{ext or '.json'}"


def run_sharded(cfg: RunConfig, shards: int, quiet: bool = False, stream=None, options: ServerOptions | None = None,
                clients_per_process: int = CLIENTS_PER_PROCESS) -> dict:
    """`efmuon run --shards N` (module docstring); returns the merged report."""
    n = parse_shard_count(shards)
    check_shardable(cfg)
    if has_links(cfg) or cfg.shaping:
        raise ConfigError("efmuon run --shards does not emulate links yet: leave out --link/--link-mix/--link-trace/"
                          "--shaping (or start `efmuon server --shard I/N` and `efmuon worker --link` yourself)")
    options = options or ServerOptions()
    if options.shard:
        raise ConfigError("give --shards N (efmuon run) or --shard I/N (efmuon server), not both")
    if options.save_model:
        raise ConfigError("--save-model with --shards is not supported yet: each shard writes REPORT.shardI.layers."
                          "safetensors (its layers' W and X) beside the report; leave --save-model out")
    setup, _ = task_setup(cfg)
    cfg = setup.cfg
    coordinators = []
    for i in range(n):
        opts = dataclasses.replace(options, shard=f"{i}/{n}",
                                   metrics_port=options.metrics_port if i == 0 or not options.metrics_port else None,
                                   checkpoint_dir=os.path.join(options.checkpoint_dir, f"shard-{i}")
                                   if options.checkpoint_dir else None)
        ci = cfg.replace(report=shard_report_path(cfg.report, i) if cfg.report else None, plots="none",
                         metrics=None if i else cfg.metrics)
        coordinators.append(build_coordinator(ci, quiet=quiet or i > 0, stream=stream, options=opts, setup=setup))
    forks = ForkServer(worker_env()) if spawn_mode() == "fork" else None
    old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        # the workers: no worker checkpoints (not supported with shards), every shard's address
        workers = LocalWorkers(coordinators[0], "127.0.0.1", {}, dataclasses.replace(options, checkpoint_dir=None),
                               None, None, forks, clients_per_process)
        reports = asyncio.run(_serve_all(coordinators, workers, n))
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if forks is not None:
            forks.close()
    if any((r.get("summary") or {}).get("partial") for r in reports):
        return {**reports[0], "shard_reports": reports}
    where = [shard_report_path(cfg.report, i) for i in range(n)] if cfg.report else None
    merged = merge_reports(reports, where, evaluate=bool(cfg.report))
    merged["config"]["report"] = cfg.report
    if cfg.report:
        _write(merged, cfg)
    if not quiet:
        s = merged["summary"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"merged {n} shards: loss at W {fmt(s.get('final_loss_w'))}  loss at X {fmt(s.get('final_loss_x'))}  "
              f"validation loss at W {fmt(s.get('eval_loss_w'))}; w_sha256 {s.get('w_sha256')}; report {cfg.report}",
              file=stream or sys.stdout, flush=True)
    return merged


def _write(merged: dict, cfg: RunConfig) -> None:
    import json

    tmp = f"{cfg.report}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(cfg.report)), exist_ok=True)
    with open(tmp, "w") as fh:
        json.dump(merged, fh, indent=1)
    os.replace(tmp, cfg.report)
    where = plots_dir(cfg)
    if where:
        from ..common.plots import write_plots  # lazy: matplotlib only when plots are written

        write_plots(merged, where, os.path.splitext(os.path.basename(cfg.report))[0])


async def _serve_all(coordinators: list, workers: LocalWorkers, n: int) -> list[dict]:
    """Serve every shard; once all listen, start the workers with every address; stop every shard when
    the workers fail or one shard ends early. Returns the shards' reports in shard order."""
    ports: dict[int, int] = {}
    listening = asyncio.Event()

    async def watch() -> None:
        await listening.wait()
        try:
            await workers.launch_at(",".join(f"127.0.0.1:{ports[i]}" for i in range(n)))
        except BaseException:
            await _stop_rest(coordinators)
            raise

    def ready(i: int):
        def on_ready(bound: int):
            ports[i] = bound
            if len(ports) == n:
                listening.set()
            return watch() if i == 0 else None
        return on_ready

    async def one(i: int, c) -> dict:
        try:
            return await serve(c, "127.0.0.1", 0, on_ready=ready(i))
        except BaseException:
            await _stop_rest(coordinators)
            raise

    try:
        out = await asyncio.gather(*(one(i, c) for i, c in enumerate(coordinators)), return_exceptions=True)
        failed = next((r for r in out if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in workers.procs)), 60)
        except asyncio.TimeoutError:
            pass
        return list(out)
    finally:
        for p in workers.procs:
            if p.returncode is None:
                p.terminate()
        for p in workers.procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except asyncio.TimeoutError:
                p.kill()
        if workers.forks is not None:
            await workers.forks.aclose()


async def _stop_rest(coordinators: list) -> None:
    for c in coordinators:
        if not c.finished.is_set():
            await c.stop()

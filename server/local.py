"""`efmuon run`: the server in this process and n worker processes on one machine.

`run_local` serves on 127.0.0.1 (a free port the OS picks) and starts n worker processes, each
`efmuon worker --server 127.0.0.1:PORT --client-id j`: forked from one zygote that loaded torch
once (inside network namespaces too: each child enters its client's), or exec'd (server.spawn). A run of more than
`--clients-per-process` K clients starts ceil(n / K) processes instead, each `efmuon worker --clients A-B`
hosting a contiguous range (worker.hosting; each client's link then comes from the run configuration),
except inside network namespaces (one process, and one namespace, per client).

Links (`--link`, `--link-mix`, `--link-trace`, a `[links]` table): client j's profile comes from
`common.links.client_links`, exactly as `efmuon simulate` assigns it, and is emulated by
`--shaping` (`cfg.shaping`):
  inproc (default with a link)  the worker's relay shapes its connection: token bucket per direction
                                plus delay/jitter/loss (worker.relay.CountingRelay); no root needed;
  netns                         server and workers each in a network namespace on a bridge, tc tbf per
                                client and direction, delay by netem or the worker's relay
                                (efmuon.server.netns); needs root.
The report then has `summary.links.<client>`: profile, mechanism, and per direction `configured_bps`
and `achieved_bps` = wire bytes of the client's round transfers of >= 64 KiB / their duration
measured at the worker (`CountingRelay.take_transfers`: up from the first byte the worker handed
over to the last byte acknowledged by the server's TCP; down from the first to the last chunk
delivered); the join phase (initial W) is reported apart under `<direction>.join`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from ..common.config import RunConfig
from ..common.errors import ConfigError, EfmuonError
from ..common.federation import client_links, federation_size, has_links
from .app import build_coordinator
from .coordinator import Coordinator
from ..common.links import parse_link
from .netns import Star, check_available
from .service import serve
from .spawn import SPAWN_ENV, ForkServer, die_with_parent, spawn_mode

log = logging.getLogger("efmuon.server")


MIN_RATE_BYTES = 64 * 1024  # transfers smaller than this measure latency, not rate: not in achieved_bps


WORKER_EXIT_TIMEOUT = 60.0  # seconds local workers get to exit after the run finished


def worker_env() -> dict[str, str]:
    """The environment of the local workers: this one, with unbuffered output (their lines come at once),
    without the EFMUON_* variables that would stand for `efmuon worker` flags (`efmuon run` gives its
    workers their flags itself: a user's EFMUON_CLIENT_ID or EFMUON_LINK must not reach them) and without
    torchrun's WORLD_SIZE (each local worker is one client, never a worker group)."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("EFMUON_") and k != SPAWN_ENV) and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "PYTHONUNBUFFERED": "1"}


class WorkerProcessError(EfmuonError):
    """A local worker process exited with an error."""


CLIENTS_PER_PROCESS = 16  # `efmuon run --clients-per-process`: a run with more clients hosts this many per process


def process_groups(n: int, per: int, one_each: bool = False) -> list[list[int]]:
    """The clients of each local worker process: one each when n <= per (or `one_each`: network
    namespaces, one per client), else ceil(n / per) processes of contiguous ranges."""
    if one_each or n <= per:
        return [[j] for j in range(n)]
    return [list(range(a, min(n, a + per))) for a in range(0, n, per)]


def clients_args(address: str, clients: list[int], stats: str | None = None) -> list[str]:
    """`efmuon worker` flags of a local process hosting `clients` (a contiguous range): each client's link
    comes from the run configuration (worker.hosting.config_links), as `worker_args` would give it."""
    spec = f"{clients[0]}-{clients[-1]}" if len(clients) > 1 else str(clients[0])
    args = ["--server", address, "--clients", spec, "--quiet"]
    if stats:
        args += ["--stats", stats]
    return args


def worker_args(address: str, client_id: int, link=None, stats: str | None = None) -> list[str]:
    """Local worker j's `efmuon worker` flags. Without a shaped link it connects straight to the server
    (which counts the wire bytes itself); with one, its relay shapes the link and reports its own counts."""
    args = ["--server", address, "--client-id", str(client_id), "--quiet"]
    if link is not None and link.is_shaped:
        args += ["--link", link.to_spec()]
    if stats:
        args += ["--stats", stats]
    return args


def _direction_summary(rate, transfers: list) -> dict:
    big = [(b, t) for b, t in transfers if b >= MIN_RATE_BYTES and t > 0]
    nbytes, secs = sum(b for b, _ in big), sum(t for _, t in big)
    return {"configured_bps": rate, "achieved_bps": nbytes * 8.0 / secs if secs > 0 else None,
            "bytes": nbytes, "seconds": secs, "transfers": len(big)}


def links_summary(links, mechanisms: dict, stats: dict) -> dict:
    """summary.links: per client the profile, the mechanism and per direction configured and achieved
    rate (module docstring) over the rounds' transfers (exchanges 0..R); the join phase (Status,
    Join: the initial W down) separately under `join`, because on one machine it overlaps with the
    other workers starting up (CPU-bound, not link-bound). `stats[j]` is worker j's --stats JSON."""
    out = {}
    for j, (desc, prof) in enumerate(links):
        st = stats.get(j) or {}
        calls = st.get("transfers") or []
        rounds = [c for c in calls if isinstance(c.get("exchange"), int) and c["exchange"] >= 0]
        joins = [c for c in calls if c not in rounds]
        side = {}
        for d, rate in (("up", prof.up_bps), ("down", prof.down_bps)):
            side[d] = _direction_summary(rate, [tuple(c[d]) for c in rounds if c.get(d)])
            side[d]["join"] = _direction_summary(rate, [tuple(c[d]) for c in joins if c.get(d)])
            del side[d]["join"]["configured_bps"]
        out[str(j)] = {"profile": desc, "mechanism": mechanisms.get(j, "none"), "delay_s": prof.delay_s,
                       "jitter_s": prof.jitter_s, "loss": prof.loss, **side}
    return out


def _print_links(summary: dict, stream) -> None:
    def mbit(v):
        return "-" if v is None else f"{v / 1e6:.3g}"

    for j, s in list(summary.items())[:16]:
        print(f"link {j:>3} {s['mechanism']:<16} up {mbit(s['up']['achieved_bps'])}/{mbit(s['up']['configured_bps'])} "
              f"Mbit/s  down {mbit(s['down']['achieved_bps'])}/{mbit(s['down']['configured_bps'])} Mbit/s "
              f"(achieved/configured)", file=stream or sys.stdout, flush=True)
    if len(summary) > 16:
        print(f"... {len(summary) - 16} more clients in the report's summary.links", file=stream or sys.stdout)


def _process_name(p: int, groups: list[list[int]] | None) -> str:
    ids = groups[p] if groups is not None else [p]
    return f"worker {ids[0]}" if len(ids) == 1 else f"worker process {p} (clients {ids[0]}-{ids[-1]})"


async def _watch(procs: list[asyncio.subprocess.Process], groups: list[list[int]] | None = None) -> None:
    """Returns when every worker exited with 0; raises when one fails."""
    waits = {asyncio.ensure_future(p.wait()): j for j, p in enumerate(procs)}
    try:
        while waits:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                j = waits.pop(f)
                if f.result() in (130, -signal.SIGINT, -signal.SIGTERM):
                    await asyncio.sleep(1.0)  # Ctrl-C reached the workers too: let the server's handler see it
                if f.result() != 0:
                    raise WorkerProcessError(f"{_process_name(j, groups)} exited with code {f.result()} (its error "
                                             "is printed above)")
    finally:
        for f in waits:
            f.cancel()


def local_worker_flags(options, j: int | list[int]) -> list[str]:
    """Flags that give local worker j what the server's options need: its token, TLS trust (the CA, or
    ca.pem next to the server certificate), client-j.pem/.key next to the CA for mutual TLS, and a
    worker checkpoint directory CKPT/worker-j. For a process hosting several clients (`j` a list):
    client-{j}.pem/.key (each must exist) and CKPT, where each client checkpoints to CKPT/client-J."""
    if options is None:
        return []
    ids = j if isinstance(j, list) else [j]
    several = isinstance(j, list) and len(j) > 1
    out = []
    if options.token_file:
        out += ["--token-file", str(options.token_file)]
        if not options.tls_cert:  # --shaping netns: plaintext off loopback, on this machine's own bridge
            out.append("--insecure")
    if options.tls_cert:
        ca = options.tls_ca or str(Path(options.tls_cert).with_name("ca.pem"))
        out += ["--tls-ca", ca]
        if options.tls_ca:
            for i in ids:
                cert, key = Path(ca).with_name(f"client-{i}.pem"), Path(ca).with_name(f"client-{i}.key")
                if not (cert.is_file() and key.is_file()):
                    raise ConfigError(f"mutual TLS (--tls-ca) with local workers needs {cert} and {key} "
                                      f"(efmuon certs DIR --clients N makes them)")
            name = "client-{j}" if several else f"client-{ids[0]}"
            out += ["--tls-cert", str(Path(ca).with_name(f"{name}.pem")),
                    "--tls-key", str(Path(ca).with_name(f"{name}.key"))]
    if options.checkpoint_dir:
        out += ["--checkpoint-dir", options.checkpoint_dir if several
                else os.path.join(options.checkpoint_dir, f"worker-{ids[0]}")]
    return out


def _on_term(signum, frame):  # SIGTERM outside serve(): unwind so the finally blocks tear down
    raise KeyboardInterrupt


class LocalWorkers:
    """The worker processes of one `efmuon run`: started once the server listens, stopped with it."""

    def __init__(self, coordinator: Coordinator, host: str, relay: dict, options, star: Star | None,
                 stats_dir: str | None, forks: ForkServer | None = None, per_process: int = CLIENTS_PER_PROCESS):
        self.coordinator, self.host, self.relay, self.options = coordinator, host, relay, options
        self.star, self.stats_dir, self.forks = star, stats_dir, forks
        # the clients of each worker process (network namespaces: one process per client, each in its own)
        self.groups = process_groups(coordinator.n, per_process, one_each=star is not None)
        self.procs: list = []  # asyncio.subprocess.Process, or spawn.ForkedWorker (the same calls)
        self.address: str | None = None  # HOST:PORT once the server listens

    def stats_path(self, p: int) -> str | None:
        """Worker process p's --stats file (named by its client where it hosts one)."""
        if not self.stats_dir:
            return None
        ids = self.groups[p]
        return os.path.join(self.stats_dir, f"worker{ids[0]}.json" if len(ids) == 1 else f"process{p}.json")

    def process_args(self, p: int, address: str) -> list[str]:
        ids = self.groups[p]
        if len(ids) == 1:
            return worker_args(address, ids[0], self.relay.get(ids[0]), self.stats_path(p)) \
                + local_worker_flags(self.options, ids[0])
        return clients_args(address, ids, self.stats_path(p)) + local_worker_flags(self.options, ids)

    async def launch(self, port: int) -> None:
        """Start the worker processes (serve's on_ready): forked from the zygote (each entering its client's
        network namespace under netns), or each exec'd; then watch them: raises when one fails."""
        await self.launch_at(f"{self.host}:{port}")

    async def launch_at(self, address: str) -> None:
        """`launch` for the server(s) at `address` (sharded servers: HOST:P0,HOST:P1,...)."""
        self.address = address
        for p, ids in enumerate(self.groups):
            args = self.process_args(p, address)
            if self.forks is not None:  # in network namespaces too: the child enters its client's namespace
                netns = self.star.clients[ids[0]] if self.star is not None else None
                self.procs.append(await self.forks.fork(p, args, netns=netns))
                continue
            cmd = die_with_parent([sys.executable, "-m", "efmuon.worker", *args])
            if self.star is not None:
                cmd = self.star.exec_prefix(self.star.clients[ids[0]]) + cmd
            self.procs.append(await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL,
                                                                   env=worker_env()))
        await _watch(self.procs, self.groups)

    async def serve(self) -> dict:
        """Serve the run with the workers; returns the report once they exited (or were stopped)."""
        try:
            report = await serve(self.coordinator, self.host, 0, on_ready=self.launch)
            signal.signal(signal.SIGTERM, _on_term)  # serve() restored the default handler
            if report["summary"].get("partial"):
                return report  # interrupted: stop the workers now (finally), do not wait for them
            try:
                await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.procs)), WORKER_EXIT_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("workers did not exit within %.0f s after the run; stopping them", WORKER_EXIT_TIMEOUT)
            return report
        finally:
            for p in self.procs:
                if p.returncode is None:
                    p.terminate()
            for p in self.procs:
                try:
                    await asyncio.wait_for(p.wait(), 10)
                except asyncio.TimeoutError:
                    p.kill()
            if self.forks is not None:
                await self.forks.aclose()

    def stats(self) -> dict[int, dict]:
        """Each client's --stats JSON (of the processes that wrote one), by client id."""
        out = {}
        for p, ids in enumerate(self.groups):
            try:
                with open(self.stats_path(p)) as fh:
                    data = json.load(fh)
            except (OSError, ValueError, TypeError):
                continue
            if len(ids) == 1:
                out[ids[0]] = data
            else:
                out.update({int(j): st for j, st in (data.get("clients") or {}).items()})
        return out

    def processes(self) -> list[dict]:
        """summary.worker_processes: each process's clients (a SPEC) and pid."""
        return [{"clients": f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]), "pid": getattr(proc, "pid", None)}
                for ids, proc in zip(self.groups, self.procs)]


def server_link_of(cfg: RunConfig, links) -> tuple[str, object] | None:
    """(spec, profile) of the server's own link under --shaping netns: `server_link` ('none': unshaped), else the
    clients' link when `link` gives them all one, else None (unshaped)."""
    spec = cfg.server_link if cfg.server_link is not None else cfg.link
    if spec is None or spec.strip().lower() == "none":
        return None
    prof = parse_link(spec)
    return (spec.strip().lower(), prof) if prof.is_shaped else None


def _shape_netns(star: Star, n: int, links, relay: dict, mechanisms: dict, quiet: bool, stream,
                 server_link=None) -> str:
    """Shape each client's link in the namespaces, and the server's own (`server_link_of`); returns the
    server's address there."""
    netem = star.netem_available()
    for j, (_, prof) in enumerate(links):
        relay[j], mechanisms[j] = star.shape(j, prof, netem)
    if server_link is not None:
        star.server_mechanism = star.shape_server(server_link[1], netem)
    if not quiet:
        print(f"netns: {n} workers in namespaces {star.prefix}-c0..c{n - 1}, server {star.server} at "
              f"{star.server_addr}; delay/jitter/loss by {'netem' if netem else 'the worker relay'}",
              file=stream or sys.stdout, flush=True)
    return star.server_addr


def _links_report(cfg: RunConfig, coordinator: Coordinator, links, mechanisms: dict, workers: LocalWorkers,
                  shaping: str, quiet: bool, stream) -> dict:
    """Add summary.links (module docstring) to the report, write it again, and return it."""
    summary = links_summary(links, mechanisms, workers.stats())
    s = coordinator.report.summary
    s["links"] = summary
    s["links_shaping"] = shaping
    s["links_server_address"] = workers.address
    if workers.star is not None:
        s["links_netns_prefix"] = workers.star.prefix
        s["server_link"] = _server_link_summary(cfg, links, workers.star, coordinator.report)
    if cfg.report:
        coordinator.report.write(cfg.report)
    report = coordinator.report.to_dict()
    if not quiet:
        _print_links(summary, stream)
    return report


def _server_link_summary(cfg: RunConfig, links, star: Star, report) -> dict:
    """summary.server_link: the server's profile and mechanism and, per direction, the configured rate, what its
    shaper sent and held back (tc), and the mean rate over the rounds (the server's wire bytes of every round /
    the rounds' wall time: a lower bound of the achieved rate, since rounds also compute)."""
    link = server_link_of(cfg, links)
    counters = star.server_qdisc_counters()
    secs = sum(r.get("seconds") or 0.0 for r in report.rounds)
    out = {"profile": link[0] if link else "none",
           "mechanism": getattr(star, "server_mechanism", "none") if link else "none"}
    for d in ("up", "down"):
        wire = sum((r["bytes"][d].get("wire") or 0) for r in report.rounds)
        out[d] = {"configured_bps": (link[1].up_bps if d == "up" else link[1].down_bps) if link else None,
                  "round_wire_bytes": wire, "mean_bps_over_rounds": wire * 8.0 / secs if secs > 0 else None,
                  "tc": counters.get(d)}
    return out


def run_local(cfg: RunConfig, quiet: bool = False, stream=None, options=None, resume=None,
              clients_per_process: int = CLIENTS_PER_PROCESS) -> dict:
    """`efmuon run`: the server here and cfg.workers worker processes on 127.0.0.1, or, with
    shaping 'netns', each in its own network namespace (module docstring). A run of more than
    `clients_per_process` clients hosts that many per process (`efmuon worker --clients A-B`),
    except in network namespaces (one process per client)."""
    if isinstance(clients_per_process, bool) or not isinstance(clients_per_process, int) or clients_per_process < 1:
        raise ConfigError(f"--clients-per-process {clients_per_process!r} is not a count: give an integer >= 1")
    shaping = cfg.shaping or ("inproc" if has_links(cfg) else None)
    if shaping == "netns":
        check_available()  # fail before the (possibly slow) model setup
    links = client_links(cfg, federation_size(cfg)) if shaping is not None else None
    # the workers' zygote loads torch while this process builds the model (server.spawn)
    forks = ForkServer(worker_env()) if spawn_mode() == "fork" else None
    try:
        return _run_local(cfg, quiet, stream, options, resume, shaping, links, forks, clients_per_process)
    finally:
        if forks is not None:
            forks.close()


def _run_local(cfg: RunConfig, quiet, stream, options, resume, shaping, links, forks: ForkServer | None,
               per_process: int) -> dict:
    coordinator = build_coordinator(cfg, quiet=quiet, stream=stream, links_ok=True, options=options, resume=resume)
    relay: dict[int, object] = {}
    mechanisms: dict[int, str] = {}
    if links is not None and shaping == "inproc":
        for j, (_, prof) in enumerate(links):
            relay[j] = prof if prof.is_shaped else None
            mechanisms[j] = "relay" if prof.is_shaped else "none"
    stats_dir = tempfile.mkdtemp(prefix="efmuon-stats-")  # each worker's --stats: links, peak RSS
    star = None
    old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        host = "127.0.0.1"
        if shaping == "netns":
            star = Star(coordinator.n).up()
            host = _shape_netns(star, coordinator.n, links, relay, mechanisms, quiet, stream,
                                server_link_of(cfg, links))
        workers = LocalWorkers(coordinator, host, relay, options, star, stats_dir, forks, per_process)
        several = len(workers.groups) < coordinator.n
        if several and not quiet:
            print(f"efmuon run: {coordinator.n} clients in {len(workers.groups)} worker processes (up to "
                  f"{per_process} each, --clients-per-process)", file=stream or sys.stdout, flush=True)
        if star is not None:
            with star.enter(star.server):  # the server's sockets live in the server's namespace
                report = asyncio.run(workers.serve())
        else:
            report = asyncio.run(workers.serve())
        if several:  # which process hosted which clients (written again below, or here)
            coordinator.report.summary["worker_processes"] = workers.processes()
        peaks = [st["peak_rss_bytes"] for st in workers.stats().values() if st.get("peak_rss_bytes")]
        if peaks:  # the largest worker process's peak RSS (written again below, or here)
            coordinator.report.summary["worker_peak_rss_bytes"] = max(peaks)
        if links is not None:
            report = _links_report(cfg, coordinator, links, mechanisms, workers, shaping, quiet, stream)
        elif several or peaks:
            if cfg.report:
                coordinator.report.write(cfg.report)
            report = coordinator.report.to_dict()
        return report
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if star is not None:
            star.down()
        if stats_dir:
            shutil.rmtree(stats_dir, ignore_errors=True)

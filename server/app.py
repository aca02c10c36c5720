"""`efmuon server` and `efmuon run`: a Coordinator for a built-in task, served over gRPC.

`run_local` is the embedded default: the server in this process on 127.0.0.1 (a free port the
OS picks) and n worker processes `python -m efmuon.worker --server 127.0.0.1:PORT --client-id j`.

Links (`--link`, `--link-mix`, `--link-trace`, a `[links]` table): client j's profile comes from
`common.federated.client_links`, exactly as `efmuon simulate` assigns it, and is emulated by
`--shaping` (`cfg.shaping`):
  inproc (default with a link)  the worker's relay shapes its connection: token bucket per direction
                                plus delay/jitter/loss (common.links.CountingRelay); no root needed;
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
import logging
import os
import signal
import sys

from efmuon.common.config import RunConfig
from efmuon.common.errors import ConfigError, EfmuonError

FEDERATED_KEYS = ("clients", "participation", "link", "link_mix", "link_trace", "deadline", "compute_scale",
                  "compute_seconds")
LINK_KEYS = ("link", "link_mix", "link_trace")  # `efmuon run` emulates these (--shaping)
MIN_RATE_BYTES = 64 * 1024  # transfers smaller than this measure latency, not rate: not in achieved_bps
from efmuon.common.training import configure_torch, resolve_device
from efmuon.server.coordinator import Coordinator, ServerModel
from efmuon.server.service import serve

log = logging.getLogger("efmuon.server")

WORKER_EXIT_TIMEOUT = 60.0  # seconds local workers get to exit after the run finished


class WorkerProcessError(EfmuonError):
    """A local worker process exited with an error."""


def build_coordinator(cfg: RunConfig, quiet: bool = False, stream=None, links_ok: bool = False,
                      options=None, resume=None) -> Coordinator:
    """The task's model and evaluation from `Setup(cfg)`, exactly as `efmuon simulate` builds them.
    `links_ok`: the caller (`run_local`) emulates link, link_mix, link_trace, links and shaping."""
    from efmuon.common.simulate import Setup

    if not links_ok and (has_links(cfg) or cfg.shaping is not None):
        raise ConfigError("link, link_mix, link_trace, [links] and shaping are emulated by `efmuon run` "
                          "(--shaping inproc|netns) and `efmuon simulate`; with `efmuon server` each worker "
                          "shapes its own connection: efmuon worker --link PROFILE")
    given = [k for k in FEDERATED_KEYS if getattr(cfg, k, None) is not None and not (links_ok and k in LINK_KEYS)]
    if given:
        raise ConfigError(f"{', '.join(given)}: federated settings are emulated by `efmuon simulate` only; the "
                          "networked server runs synchronous rounds over all --workers clients (leave them unset)")
    configure_torch(cfg.threads)
    setup = Setup(cfg)
    return Coordinator(setup.cfg, ServerModel.from_setup(setup), device=resolve_device(setup.cfg.device),
                       quiet=quiet, stream=stream, options=options, resume=resume)


def run_server(cfg: RunConfig, host: str, port: int, quiet: bool = False, options=None, resume=None) -> dict:
    """`efmuon server`: serve one run for workers on other machines; returns the report.
    `options`: a coordinator.ServerOptions; `resume`: a loaded server checkpoint to continue from."""

    async def main() -> dict:
        coordinator = build_coordinator(cfg, quiet=quiet, options=options, resume=resume)

        def ready(bound: int) -> None:
            print(f"efmuon server: listening on {host}:{bound} for {coordinator.n} workers "
                  f"({coordinator.rounds} rounds, task {coordinator.cfg.task}); "
                  f"start them with: efmuon worker --server HOST:{bound} --client-id J", file=sys.stderr, flush=True)

        return await serve(coordinator, host, port, on_ready=ready)

    return asyncio.run(main())


def worker_command(address: str, client_id: int, link=None, stats: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "efmuon.worker", "--server", address, "--client-id", str(client_id), "--quiet"]
    if link is not None and link.is_shaped:
        cmd += ["--link", link.to_spec()]
    if stats:
        cmd += ["--stats", stats]
    return cmd


def has_links(cfg: RunConfig) -> bool:
    return any(getattr(cfg, k, None) is not None for k in LINK_KEYS) or bool(getattr(cfg, "links", None))


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


async def _watch(procs: list[asyncio.subprocess.Process]) -> None:
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
                    raise WorkerProcessError(f"worker {j} exited with code {f.result()} (its error is printed above)")
    finally:
        for f in waits:
            f.cancel()


def local_worker_flags(options, j: int) -> list[str]:
    """Flags that give local worker j what the server's options need: its token, TLS trust (the CA, or
    ca.pem next to the server certificate), client-j.pem/.key next to the CA for mutual TLS, and a
    worker checkpoint directory CKPT/worker-j."""
    from pathlib import Path

    if options is None:
        return []
    out = []
    if options.token_file:
        out += ["--token-file", str(options.token_file)]
    if options.tls_cert:
        ca = options.tls_ca or str(Path(options.tls_cert).with_name("ca.pem"))
        out += ["--tls-ca", ca]
        if options.tls_ca:
            cert, key = Path(ca).with_name(f"client-{j}.pem"), Path(ca).with_name(f"client-{j}.key")
            if not (cert.is_file() and key.is_file()):
                raise ConfigError(f"mutual TLS (--tls-ca) with local workers needs {cert} and {key} "
                                  f"(efmuon certs DIR --clients N makes them)")
            out += ["--tls-cert", str(cert), "--tls-key", str(key)]
    if options.checkpoint_dir:
        out += ["--checkpoint-dir", os.path.join(options.checkpoint_dir, f"worker-{j}")]
    return out


def run_local(cfg: RunConfig, quiet: bool = False, stream=None, options=None, resume=None) -> dict:
    """`efmuon run`: the server here and cfg.workers worker processes on 127.0.0.1, or, with
    shaping 'netns', each in its own network namespace (module docstring)."""
    import json
    import tempfile

    shaping = cfg.shaping or ("inproc" if has_links(cfg) else None)
    star = None
    if shaping == "netns":
        from efmuon.server.netns import check_available

        check_available()  # fail before the (possibly slow) model setup
    links = None
    if shaping is not None:
        from efmuon.common.federated import client_links

        links = client_links(cfg, int(cfg.workers))
    coordinator = build_coordinator(cfg, quiet=quiet, stream=stream, links_ok=True, options=options, resume=resume)
    relay: dict[int, object] = {}
    mechanisms: dict[int, str] = {}
    host = "127.0.0.1"
    if links is not None:
        if shaping == "inproc":
            for j, (_, prof) in enumerate(links):
                relay[j] = prof if prof.is_shaped else None
                mechanisms[j] = "relay" if prof.is_shaped else "none"
    stats_dir = tempfile.mkdtemp(prefix="efmuon-stats-") if links is not None else None

    def on_term(signum, frame):  # SIGTERM outside serve(): unwind so the finally blocks tear down
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        if shaping == "netns":
            from efmuon.server.netns import Star

            star = Star(coordinator.n).up()
            netem = star.netem_available()
            for j, (_, prof) in enumerate(links):
                relay[j], mechanisms[j] = star.shape(j, prof, netem)
            host = star.server_addr
            if not quiet:
                print(f"netns: {coordinator.n} workers in namespaces {star.prefix}-c0..c{coordinator.n - 1}, server "
                      f"{star.server} at {host}; delay/jitter/loss by {'netem' if netem else 'the worker relay'}",
                      file=stream or sys.stdout, flush=True)

        served: dict = {}

        def stats_path(j: int) -> str | None:
            return os.path.join(stats_dir, f"worker{j}.json") if stats_dir else None

        async def main() -> dict:
            procs: list[asyncio.subprocess.Process] = []
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}

            async def launch(port: int) -> None:
                address = served["address"] = f"{host}:{port}"
                for j in range(coordinator.n):
                    cmd = worker_command(address, j, relay.get(j), stats_path(j)) + local_worker_flags(options, j)
                    if star is not None:
                        cmd = star.exec_prefix(star.clients[j]) + cmd
                    procs.append(await asyncio.create_subprocess_exec(
                        *cmd, stdin=asyncio.subprocess.DEVNULL, env=env))
                await _watch(procs)

            try:
                report = await serve(coordinator, host, 0, on_ready=launch)
                signal.signal(signal.SIGTERM, on_term)  # serve() restored the default handler
                if report["summary"].get("partial"):
                    return report  # interrupted: stop the workers now (finally), do not wait for them
                try:
                    await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), WORKER_EXIT_TIMEOUT)
                except asyncio.TimeoutError:
                    log.warning("workers did not exit within %.0f s after the run; stopping them", WORKER_EXIT_TIMEOUT)
                return report
            finally:
                for p in procs:
                    if p.returncode is None:
                        p.terminate()
                for p in procs:
                    try:
                        await asyncio.wait_for(p.wait(), 10)
                    except asyncio.TimeoutError:
                        p.kill()

        if star is not None:
            with star.enter(star.server):  # the server's sockets live in the server's namespace
                report = asyncio.run(main())
        else:
            report = asyncio.run(main())
        if links is not None:
            stats = {}
            for j in range(coordinator.n):
                try:
                    with open(stats_path(j)) as fh:
                        stats[j] = json.load(fh)
                except (OSError, ValueError):
                    pass
            summary = links_summary(links, mechanisms, stats)
            coordinator.report.summary["links"] = summary
            coordinator.report.summary["links_shaping"] = shaping
            coordinator.report.summary["links_server_address"] = served.get("address")
            if star is not None:
                coordinator.report.summary["links_netns_prefix"] = star.prefix
            if cfg.report:
                coordinator.report.write(cfg.report)
            report = coordinator.report.to_dict()
            if not quiet:
                _print_links(summary, stream)
        return report
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if star is not None:
            star.down()
        if stats_dir:
            import shutil

            shutil.rmtree(stats_dir, ignore_errors=True)

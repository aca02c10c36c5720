"""TODO docstring"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from ..common.config import RunConfig
from ..common.errors import ConfigError, EfmuonError
from ..common.links import client_links, has_links
from .app import build_coordinator
from .netns import Star, check_available
from .service import serve

log = logging.getLogger("efmuon.server")


MIN_RATE_BYTES = 64 * 1024  # transfers smaller than this measure latency, not rate: not in achieved_bps


WORKER_EXIT_TIMEOUT = 60.0  # seconds local workers get to exit after the run finished


class WorkerProcessError(EfmuonError):
    """A local worker process exited with an error."""


def worker_command(address: str, client_id: int, link=None, stats: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "efmuon.worker", "--server", address, "--client-id", str(client_id), "--quiet"]
    if link is not None and link.is_shaped:
        cmd += ["--link", link.to_spec()]
    if stats:
        cmd += ["--stats", stats]
    return cmd


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

        check_available()  # fail before the (possibly slow) model setup
    links = None
    if shaping is not None:

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

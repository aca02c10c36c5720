"""Kernel link shaping for `efmuon run --shaping netns`: network namespaces, a bridge and `tc`.

Topology (a star; the same recipe as deploy/netns-up.sh and deploy/netns-shape.sh):

    PREFIX-sw   the switch: bridge br0; one veth port per host (ps for the server, p0..p{n-1})
    PREFIX-s    the server: eth0 = 10.77.0.1/16
    PREFIX-cJ   client J:   eth0 = 10.77.(1 + J // 250).(1 + J % 250)/16

Every address exists only inside these namespaces: nothing is routed in the root namespace, and
the veth pairs are created inside the switch namespace, so concurrent runs never collide.

Shaping per client and direction with `tbf` (section 1 of the research notes):
  upload   on the client's own eth0 (egress towards the switch);
  download on the switch port pJ (egress towards the client).
  burst = max(16 KiB, 2 ms of rate): above the MTU and the GSO segments tbf re-segments (P2), small
  enough not to give a free head start; limit = max(256 KiB, 0.8 s of rate): holds what TCP small
  queues push onto the sender's own interface without local drops (P3: 1 MB at 10 Mbit/s).
Delay, jitter and loss: `netem` under the tbf where the kernel has it (probed once per run with
`tc qdisc add dev lo root netem` in the switch namespace); otherwise the worker's relay adds them
in user space (rate stays with tbf): mechanism "tbf+relay-delay" instead of "tbf+netem".
Loss differs between the two: netem drops packets (TCP retransmits them), the relay models a loss
per 64 KiB as a retransmission timeout (common.links). The netem path is written from the tc
documentation but untested here: this machine's kernel has no netem.

Teardown: `Star.down()` deletes every namespace of the run (which removes the veths and qdiscs).
`efmuon run` calls it in a finally block, from atexit and on SIGTERM/SIGINT; a run killed with
SIGKILL leaves namespaces named efm-PID-XXXX-*, which the next run removes when PID is gone
(`cleanup_stale()`), or by hand: deploy/netns-down.sh efm-PID-XXXX.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import subprocess
import threading

from ..common.errors import EfmuonError
from ..common.links import LinkProfile

NEED_ROOT = "--shaping netns needs root (ip netns add): run as root or use --shaping inproc"
SUBNET = "10.77"
SERVER_ADDR = f"{SUBNET}.0.1"
CLONE_NEWNET = 0x40000000
_STALE = re.compile(r"^efm-(\d+)-[0-9a-f]{4}-")


class NetnsError(EfmuonError):
    """Namespaces or tc could not be set up (not root, tool missing, kernel feature missing)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed (rc {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def check_available() -> None:
    """Raise NetnsError with NEED_ROOT (or the missing tool) unless `ip netns` can be used here."""
    if os.geteuid() != 0:
        raise NetnsError(NEED_ROOT)
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsError(f"--shaping netns needs the `{tool}` command (package iproute2); "
                             "install it or use --shaping inproc")
    if _run("ip", "netns", "list", check=False).returncode != 0:
        raise NetnsError(NEED_ROOT)


def client_addr(j: int) -> str:
    return f"{SUBNET}.{1 + j // 250}.{1 + j % 250}"


def tbf_args(rate_bps: float) -> list[str]:
    """tbf parameters for a rate in bits/s (see the module docstring)."""
    byte_rate = rate_bps / 8.0
    burst = int(min(4 << 20, max(16 << 10, byte_rate * 0.002)))
    limit = int(min(64 << 20, max(256 << 10, byte_rate * 0.8, 2 * burst)))
    return ["tbf", "rate", f"{int(round(rate_bps))}bit", "burst", str(burst), "limit", str(limit)]


def netem_args(profile: LinkProfile) -> list[str]:
    args = ["netem", "delay", f"{profile.delay_s * 1e3:.3f}ms"]
    if profile.jitter_s:
        args += [f"{profile.jitter_s * 1e3:.3f}ms"]
    if profile.loss:
        args += ["loss", f"{profile.loss * 100:.6g}%"]
    return args


def cleanup_stale() -> list[str]:
    """Delete namespaces left by efmuon runs whose process is gone; returns their names."""
    p = _run("ip", "netns", "list", check=False)
    gone = []
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _STALE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _run("ip", "netns", "del", name, check=False)
            gone.append(name)
    return gone


_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


def _add_qdiscs(profile: LinkProfile, netem: bool, up: tuple[str, str], down: tuple[str, str]) -> bool:
    """The qdiscs of one link: `up` and `down` are the (namespace, device) whose egress carries each
    direction; netem (delay, jitter, loss) at the root with tbf under it where the kernel has netem, else tbf
    alone. Returns whether the profile has delay, jitter or loss."""
    needs_delay = bool(profile.delay_s or profile.jitter_s or profile.loss)
    for rate, (ns, dev) in ((profile.up_bps, up), (profile.down_bps, down)):
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev]
        if needs_delay and netem:
            _run(*tc, "root", "handle", "1:", *netem_args(profile))
            if rate:
                _run(*tc, "parent", "1:1", "handle", "10:", *tbf_args(rate))
        elif rate:
            _run(*tc, "root", "handle", "1:", *tbf_args(rate))
    return needs_delay


class Star:
    """The namespaces of one run (module docstring). `up()`, `shape()`, `enter(ns)`, `down()`."""

    def __init__(self, n: int, prefix: str | None = None):
        self.n = int(n)
        self.prefix = prefix or f"efm-{os.getpid()}-{secrets.token_hex(2)}"
        self.switch = f"{self.prefix}-sw"
        self.server = f"{self.prefix}-s"
        self.clients = [f"{self.prefix}-c{j}" for j in range(self.n)]
        self.server_addr = SERVER_ADDR
        self.mechanisms: dict[int, dict] = {}
        self._created: list[str] = []
        self._lock = threading.Lock()
        self._down = False

    # ------------------------------------------------------------------ setup
    def up(self) -> "Star":
        check_available()
        cleanup_stale()
        atexit.register(self.down)
        try:
            self._add_ns(self.switch)
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            self._add_host(self.server, "ps", self.server_addr)
            for j, ns in enumerate(self.clients):
                self._add_host(ns, f"p{j}", client_addr(j))
        except BaseException:
            self.down()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._created.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def _add_host(self, ns: str, port: str, addr: str) -> None:
        self._add_ns(ns)
        _run("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
        _run("ip", "-n", self.switch, "link", "set", port, "up")
        _run("ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")

    def netem_available(self) -> bool:
        """Try `tc qdisc add dev lo root netem delay 1ms` in the switch namespace (then remove it)."""
        p = _run("ip", "netns", "exec", self.switch, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                 "delay", "1ms", check=False)
        if p.returncode == 0:
            _run("ip", "netns", "exec", self.switch, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
            return True
        return False

    def shape(self, j: int, profile: LinkProfile, netem: bool) -> tuple[LinkProfile | None, str]:
        """Put client j's link on its veths. Returns (what the worker's relay must still emulate,
        or None; the mechanism, e.g. 'tbf+relay-delay')."""
        needs_delay = _add_qdiscs(profile, netem, up=(self.clients[j], "eth0"), down=(self.switch, f"p{j}"))
        parts = (["tbf"] if (profile.up_bps or profile.down_bps) else [])
        relay = None
        if needs_delay:
            if netem:
                parts.append("netem")
            else:
                parts.append("relay-delay")
                relay = LinkProfile(delay_s=profile.delay_s, jitter_s=profile.jitter_s, loss=profile.loss)
        mech = "+".join(parts) or "none"
        self.mechanisms[j] = {"mechanism": mech, "relay": relay}
        return relay, mech

    def shape_server(self, profile: LinkProfile, netem: bool) -> str:
        """The server's own link: `up` (towards the server, every client's uplink together) on the switch
        port to the server, `down` (from it) on the server's interface; delay by netem where the kernel has it
        (the worker relays cannot delay the server's side). Returns the mechanism, e.g. 'tbf'."""
        needs_delay = _add_qdiscs(profile, netem, up=(self.switch, "ps"), down=(self.server, "eth0"))
        parts = (["tbf"] if (profile.up_bps or profile.down_bps) else []) + (["netem"] if needs_delay and netem else [])
        mech = "+".join(parts) or "none"
        if needs_delay and not netem:
            mech += " (no delay: this kernel has no netem)"
        return mech

    def server_qdisc_counters(self) -> dict:
        """Per direction of the server's link: bytes the shaper sent and how often it held packets back
        (`overlimits`: the link was the bottleneck), from `tc -s qdisc`."""
        out = {}
        for direction, ns, dev in (("up", self.switch, "ps"), ("down", self.server, "eth0")):
            text = _run("ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev, check=False).stdout
            m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", text)
            out[direction] = ({"sent_bytes": int(m.group(1)), "dropped": int(m.group(3)),
                               "overlimits": int(m.group(4))} if m else None)
        return out

    def qdisc_stats(self, j: int) -> dict:
        """`tc -s qdisc` text of client j's two shaped interfaces (for debugging and tests)."""
        up = _run("ip", "netns", "exec", self.clients[j], "tc", "-s", "qdisc", "show", "dev", "eth0", check=False)
        down = _run("ip", "netns", "exec", self.switch, "tc", "-s", "qdisc", "show", "dev", f"p{j}", check=False)
        return {"up": up.stdout, "down": down.stdout}

    # ------------------------------------------------------------------ running inside
    def exec_prefix(self, ns: str) -> list[str]:
        """argv prefix that runs a command inside namespace ns."""
        return ["ip", "netns", "exec", ns]

    @contextlib.contextmanager
    def enter(self, ns: str):
        """Move the calling thread into namespace ns (threads it starts inherit it); restore on exit.
        Sockets created meanwhile (e.g. the gRPC server's listener) live in ns."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    # ------------------------------------------------------------------ teardown
    def down(self) -> None:
        """Delete every namespace of this run (idempotent; also the ones a failed setup left)."""
        with self._lock:
            if self._down:
                return
            self._down = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)
        p = _run("ip", "netns", "list", check=False)
        names = {line.split()[0] for line in p.stdout.splitlines() if line.split()}
        for ns in [*self.clients, self.server, self.switch]:
            if ns in names or ns in self._created:
                _run("ip", "netns", "del", ns, check=False)

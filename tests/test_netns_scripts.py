"""deploy/netns-down.sh removes only the namespaces of runs that are gone: `efmuon run --shaping netns` names them
efm-PID-XXXX-* (server/netns.py), and a namespace whose PID is alive is kept unless --force.

Needs root and `ip netns`; skipped otherwise. Every namespace created here is removed at the end.
"""
from __future__ import annotations

import os
import pathlib
import re
import secrets
import shutil
import subprocess

import pytest
from efmuon.server.netns import _STALE, Star

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOWN = ROOT / "deploy" / "netns-down.sh"
DEAD_PID = 2**22 + 1  # above the largest pid_max Linux allows: never a live process


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is not available"
    return None


pytestmark = pytest.mark.skipif(_netns_usable() is not None, reason=f"netns scripts: {_netns_usable()}")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


@pytest.fixture
def two_runs():
    """Namespaces named as Star names them (efm-PID-XXXX-sw, -s): one run alive (this process), one gone."""
    tag = secrets.token_hex(2)
    live = Star(1, prefix=f"efm-{os.getpid()}-{tag}")
    dead = Star(1, prefix=f"efm-{DEAD_PID}-{tag}")
    made = [live.switch, live.server, dead.switch, dead.server]
    try:
        for ns in made:
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        yield live, dead
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_down_removes_only_the_namespaces_of_runs_that_are_gone(two_runs):
    # Prepare
    live, dead = two_runs
    assert _STALE.match(live.switch) and _STALE.match(dead.switch)  # the names the Python side recognises

    # Execute: every efmuon namespace, as README suggests after a SIGKILL
    p = subprocess.run([DOWN, "efm-"], capture_output=True, text=True, timeout=60)

    # Assert
    assert p.returncode == 0, p.stderr
    left = namespaces()
    assert {live.switch, live.server} <= left
    assert not {dead.switch, dead.server} & left
    assert f"kept {live.switch}: its run (pid {os.getpid()}) is alive" in p.stderr
    assert re.search(r"removed \d+ namespaces starting with efm-; kept \d+ of live runs", p.stdout)


def test_down_keeps_a_live_run_named_exactly_unless_force(two_runs):
    # Prepare
    live, _ = two_runs

    # Execute
    kept = subprocess.run([DOWN, live.prefix], capture_output=True, text=True, timeout=60)
    after_kept = namespaces()
    forced = subprocess.run([DOWN, "--force", live.prefix], capture_output=True, text=True, timeout=60)

    # Assert
    assert kept.returncode == 0 and {live.switch, live.server} <= after_kept
    assert f"removed 0 namespaces starting with {live.prefix}; kept 2 of live runs" in kept.stdout
    assert forced.returncode == 0 and not {live.switch, live.server} & namespaces()
    assert f"removed 2 namespaces starting with {live.prefix}" in forced.stdout


def test_down_removes_namespaces_without_an_owner_and_checks_its_arguments():
    # Prepare: a deploy/netns-up.sh style name (no pid in it)
    ns = f"efmt{secrets.token_hex(3)}-sw"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        # Execute
        p = subprocess.run([DOWN, ns[:-3]], capture_output=True, text=True, timeout=60)
        usage = subprocess.run([DOWN], capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    # Assert
    assert p.returncode == 0 and ns not in namespaces()
    assert usage.returncode == 2 and "usage" in usage.stderr

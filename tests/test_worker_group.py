"""Worker groups (efmuon/worker/group.py): under torchrun, K ranks are one EF21 client with a K-way split batch.

* 2 groups of 2 ranks (gloo, CPU, real processes started by `python -m torch.distributed.run`) against one
  `efmuon server --workers 2` train gpt-char to the losses of 2 single workers with the same batch (each
  rank took half of it), within float tolerance, and each group's bytes are one worker's;
* a rank that fails stops its group, naming the rank; rank 0's failure reaches the others;
* EFMUON_* variables stand for every `efmuon worker` flag (the command line wins, a bad value names the
  variable);
* deploy/slurm/efmuon.sbatch runs for real with `srun` and `scontrol` replaced by stand-ins that start each
  "node's" command in its own network namespace (root; skipped otherwise; every namespace and hosts file
  made here is removed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from efmuon.cli import build_parser, main
from efmuon.cli.environment import env_name, resolve, track
from efmuon.cli.worker import add_worker_flags
from efmuon.common.errors import ConfigError
from efmuon.worker.group import GroupError, group_ranks, split_batch, world_size

from conftest import CLI

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2"]
# a small gpt-char; batch_size 8: each of a group's 2 ranks computes 4 windows
TASK = ["--task", "gpt-char", "--task-option", "d_model=16", "--task-option", "n_layers=1", "--task-option",
        "n_heads=2", "--task-option", "context=16", "--task-option", "batch_size=8", "--rounds", "3",
        "--eval-every", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_env(**extra: str) -> dict[str, str]:
    """This environment without torchrun's or efmuon's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EFMUON_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                         "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env.update(extra)
    return env


def serve(tmp_path, name: str, port: int, flags: list[str]) -> tuple[subprocess.Popen, pathlib.Path]:
    log = tmp_path / f"{name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(CLI + ["server", "--host", "127.0.0.1", "--port", str(port), *flags,
                                       "--report", str(tmp_path / f"{name}.json"), "--plots", "none"],
                                stdout=fh, stderr=subprocess.STDOUT, text=True, env=plain_env())
    return proc, log


def finish(server: subprocess.Popen, workers: list[subprocess.Popen], log: pathlib.Path) -> list[str]:
    """Wait for the workers and the server; every one must succeed. Returns the workers' output."""
    outs = []
    try:
        for w in workers:
            out, _ = w.communicate(timeout=120)
            outs.append(out)
            assert w.returncode == 0, out[-3000:]
        assert server.wait(60) == 0, log.read_text()[-3000:]
    finally:
        for p in [server, *workers]:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


# ---------------------------------------------------------------------- the batch split and the variables
def test_split_batch_gives_each_rank_its_rows_and_weight():
    x, y = torch.arange(10).view(5, 2), torch.arange(5)
    parts = [split_batch((x, y), r, 2) for r in range(2)]
    assert [(p[1], p[2]) for p in parts] == [(3, 5), (2, 5)]  # tensor_split: the first 5 mod 2 ranks 1 more
    assert torch.equal(torch.cat([p[0][0] for p in parts]), x) and torch.equal(torch.cat([p[0][1] for p in parts]), y)
    assert split_batch({"a": x}, 1, 2)[0]["a"].shape == (2, 2)
    with pytest.raises(GroupError, match="3 rows, fewer than the group's 4 ranks"):
        split_batch(torch.zeros(3, 1), 0, 4)
    with pytest.raises(GroupError, match="cannot split a batch holding str"):
        split_batch(("text", x), 0, 2)
    with pytest.raises(GroupError, match="different numbers of rows"):
        split_batch((x, torch.zeros(4)), 0, 2)


def test_torchrun_variables_are_read_and_a_bad_one_is_named():
    assert world_size({}) == 1 and world_size({"WORLD_SIZE": "4"}) == 4
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert group_ranks(env) == (1, 1, 2)
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not a whole number"):
        world_size({"WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="RANK=2 is not below WORLD_SIZE=2"):
        group_ranks({**env, "RANK": "2"})
    with pytest.raises(ConfigError, match="MASTER_PORT is not set"):
        group_ranks({**env, "MASTER_PORT": ""})


def _parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_worker_flags(p)
    track(p)
    return resolve(p.parse_args(argv), environ)


def test_every_worker_flag_has_an_efmuon_variable_and_the_command_line_wins():
    p = argparse.ArgumentParser()
    add_worker_flags(p)
    names = track(p)
    flags = [max(a.option_strings, key=len) for a in p._actions if a.option_strings and a.dest != "help"]  # noqa: SLF001
    assert names == [env_name(f) for f in flags] and "EFMUON_TOKEN_FILE" in names and "EFMUON_TLS_CA" in names
    env = {"EFMUON_SERVER": "10.0.0.5:50051", "EFMUON_CLIENT_ID": "3", "EFMUON_RECONNECT_TIMEOUT": "12.5",
           "EFMUON_DEVICE": "cpu", "EFMUON_INSECURE": "yes", "EFMUON_QUIET": "0", "EFMUON_TOKEN_FILE": "",
           "EFMUON_TLS_CA": "/ca.pem"}
    a = _parse([], env)
    assert (a.server, a.client_id, a.reconnect_timeout, a.device, a.insecure, a.quiet) == \
        ("10.0.0.5:50051", 3, 12.5, "cpu", True, False)
    assert a.token_file is None and a.tls_ca == "/ca.pem" and a.connect_timeout is None and a.clients is None
    b = _parse(["--server", "h:1", "--client-id", "5", "--device", "auto"], env)
    assert (b.server, b.client_id, b.device) == ("h:1", 5, "auto")
    c = _parse(["--clients", "0-3"], env)  # a flag on the command line also beats the variable of a flag it excludes
    assert c.clients == "0-3" and c.client_id is None


@pytest.mark.parametrize("env, word", [
    ({"EFMUON_CLIENT_ID": "x"}, "EFMUON_CLIENT_ID='x' is not a valid int for --client-id"),
    ({"EFMUON_DEVICE": "tpu"}, "EFMUON_DEVICE='tpu' is not one of cpu, cuda, auto"),
    ({"EFMUON_INSECURE": "maybe"}, "EFMUON_INSECURE='maybe' is not a boolean"),
    ({"EFMUON_CLIENT_ID": "1", "EFMUON_CLIENTS": "0-3"}, "EFMUON_CLIENT_ID and EFMUON_CLIENTS are both set"),
    ({"EFMUON_SERVER": ""}, "--server is required: give it, or set EFMUON_SERVER"),
])
def test_a_bad_variable_is_a_clear_error_naming_it(env, word, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the worker tried to reach the server")

    monkeypatch.setattr("efmuon.worker.reconnect.reach", never)
    for k in [k for k in os.environ if k.startswith("EFMUON_")]:
        monkeypatch.delenv(k)
    env = {"EFMUON_SERVER": "127.0.0.1:1", **env}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["worker"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("efmuon worker: error: ") and word in err, err


def test_the_worker_help_lists_the_variables(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "EFMUON_SERVER, EFMUON_CLIENT_ID, EFMUON_CLIENTS" in out and "EFMUON_TOKEN_FILE" in out
    assert "a flag on the command line wins over its variable" in out and "worker group" in out


# ---------------------------------------------------------------------- groups against a real server
def rank_env(port: int, client: int, rank: int, master_port: int) -> dict[str, str]:
    """The variables torchrun gives rank `rank` of a group of 2 (the ranks are started here directly)."""
    return plain_env(EFMUON_SERVER=f"127.0.0.1:{port}", EFMUON_CLIENT_ID=str(client), RANK=str(rank),
                     LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(master_port))


def _groups_and_singles(tmp_path):
    """(report of 2 groups of 2 ranks, report of 2 single workers, the groups' outputs, their --stats): both
    runs at once, each against its own server; the singles are 2 Workers of one `--clients 0-1` process."""
    flags = [*TASK, "--workers", "2"]
    gport, sport = free_port(), free_port()
    gserver, glog = serve(tmp_path, "groups", gport, flags)
    sserver, slog = serve(tmp_path, "singles", sport, flags)
    ranks = []
    for j in range(2):
        master = free_port()
        for r in range(2):
            ranks.append(subprocess.Popen(CLI + ["worker", "--stats", str(tmp_path / f"group{j}.json")],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          env=rank_env(gport, j, r, master)))
    singles = subprocess.Popen(CLI + ["worker", "--server", f"127.0.0.1:{sport}", "--clients", "0-1", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=plain_env())
    outs = finish(gserver, ranks, glog)
    finish(sserver, [singles], slog)
    stats = [json.loads((tmp_path / f"group{j}.json").read_text()) for j in range(2)]
    return (json.loads((tmp_path / "groups.json").read_text()), json.loads((tmp_path / "singles.json").read_text()),
            ["".join(outs[2 * j:2 * j + 2]) for j in range(2)], stats)


@pytest.mark.slow
def test_two_groups_of_two_ranks_train_like_two_workers_and_cost_what_they_cost(tmp_path):
    groups, singles, outs, stats = _groups_and_singles(tmp_path)
    g, s = groups["summary"], singles["summary"]
    assert g["rounds"] == s["rounds"] == 3
    for key in ("final_loss_w", "final_loss_x", "eval_loss_w", "initial_loss"):
        assert g[key] == pytest.approx(s[key], rel=1e-4, abs=1e-5), key
    for rg, rs in zip(groups["rounds"], singles["rounds"]):
        assert rg["loss_w"] == pytest.approx(rs["loss_w"], rel=1e-4, abs=1e-5)
        if "train_loss" in rs:  # the mean of the clients' losses: each group's is the mean of its ranks' halves
            assert rg["train_loss"] == pytest.approx(rs["train_loss"], rel=1e-4, abs=1e-5)
    assert g["initial_loss"] < 5 and g["final_loss_w"] < g["initial_loss"]  # it trained
    for j in ("0", "1"):  # a group is one client on the wire: one worker's payload and messages
        for table in ("client_bytes", "init_clients"):
            for way in ("up", "down"):
                got, want = g[table][j][way], s[table][j][way]
                assert got["payload"] == want["payload"], (table, j, way)
                # the messages also carry varints of the round's figures (a loss, a time); the wire adds
                # HTTP/2 framing, window updates and pings, which vary with the load from run to run
                assert got["message"] == pytest.approx(want["message"], abs=16), (table, j, way)
                assert got["wire"] == pytest.approx(want["wire"], rel=0.1), (table, j, way)
    for j, (out, st) in enumerate(zip(outs, stats)):
        assert f"worker {j}: 3 rounds" in out and "worker group rank 1: 4 gradients" in out, out
        assert st["client_id"] == j and st["group"] == {"ranks": 2} and st["w_sha256"] == g["w_sha256"]


def run_group(server: str, *flags: str) -> list[subprocess.CompletedProcess]:
    """The 2 ranks of one group (started here with torchrun's variables) to the end; their results."""
    master = free_port()
    env = [rank_env(0, 0, r, master) for r in range(2)]
    for e in env:
        e.pop("EFMUON_SERVER"), e.pop("EFMUON_CLIENT_ID")
    procs = [subprocess.Popen(CLI + ["worker", "--server", server, *flags], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=e) for e in env]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_a_failing_rank_stops_its_group_naming_it(tmp_path):
    port = free_port()
    server, log = serve(tmp_path, "fail", port, [*TASK, "--workers", "1", "--task-option", "batch_size=1"])
    try:
        # batch_size 1 cannot be split 2 ways: every rank fails computing round 0, the group stops
        ranks = run_group(f"127.0.0.1:{port}", "--client-id", "0")
        for r in ranks:
            assert r.returncode == 2
            assert "efmuon worker: error: worker group rank 0 failed computing round 0: the batch has 1 rows, " \
                   "fewer than the group's 2 ranks" in r.stderr, r.stderr[-3000:]
        # rank 0 left the run saying why (the server logs it)
        deadline = time.monotonic() + 30
        while "worker group rank 0 failed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "worker group rank 0 failed computing round 0" in log.read_text(), log.read_text()[-3000:]
        # rank 0 cannot reach the server: the other rank is told, and both name it
        dead = free_port()
        ranks = run_group(f"127.0.0.1:{dead}", "--connect-timeout", "0", "--reconnect-timeout", "0")
        assert [r.returncode for r in ranks] == [2, 2]
        assert f"efmuon worker: error: nothing listens on 127.0.0.1:{dead}" in ranks[0].stderr, ranks[0].stderr
        assert f"efmuon worker: error: worker group rank 0 failed: nothing listens on 127.0.0.1:{dead}" in \
            ranks[1].stderr, ranks[1].stderr[-3000:]
        assert "Status" not in ranks[1].stderr and "Join" not in ranks[1].stderr  # rank 1 never called the server
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_group_and_rank_0_leaves_saying_why(tmp_path):
    port = free_port()
    server, log = serve(tmp_path, "dies", port, [*TASK, "--workers", "1", "--rounds", "2000", "--eval-every", "1000"])
    master = free_port()
    ranks = [subprocess.Popen(CLI + ["worker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=rank_env(port, 0, r, master)) for r in range(2)]
    try:
        deadline = time.monotonic() + 60
        while "/2000  loss_w" not in log.read_text():  # the group trains ...
            assert time.monotonic() < deadline and ranks[0].poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        ranks[1].kill()  # ... until its rank 1 dies outright
        _, err = ranks[0].communicate(timeout=60)
        assert ranks[0].returncode == 2, err[-3000:]
        assert "efmuon worker: error: worker group rank 0: a collective failed (another rank died" in err, err[-3000:]
        deadline = time.monotonic() + 30
        while "a collective failed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "a collective failed" in log.read_text(), log.read_text()[-3000:]  # rank 0 left saying why
    finally:
        for p in [server, *ranks]:
            if p.poll() is None:
                p.kill()
            p.wait()


# ---------------------------------------------------------------------- the Slurm script, in namespaces
def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "needs `ip netns`"
    return None


SRUN = r'''#!PYTHON
"""A stand-in for Slurm's srun: each node of --nodelist runs the command in its own network namespace
(FAKE_SLURM_NETNS: node=namespace,...) with the variables srun sets (one task per node)."""
import json, os, signal, subprocess, sys
args, opts = sys.argv[1:], {}
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    opts[key] = value if _ else args.pop(0)
nodes = opts["--nodelist"].split(",")
assert len(nodes) == int(opts["--nodes"]) == int(opts["--ntasks"]), opts
assert opts.get("--ntasks", "1") == opts.get("--ntasks-per-node", "1") or opts.get("--ntasks-per-node") == "1", opts
where = dict(item.split("=") for item in os.environ["FAKE_SLURM_NETNS"].split(","))
with open(os.environ["FAKE_SLURM_LOG"], "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\n")
procs = []
for i, node in enumerate(nodes):
    env = {**os.environ, "SLURM_PROCID": str(i), "SLURM_NODEID": str(i), "SLURM_NTASKS": str(len(nodes)),
           "SLURM_STEP_NODELIST": opts["--nodelist"], "SLURMD_NODENAME": node,
           "SLURM_GPUS_ON_NODE": os.environ.get("FAKE_SLURM_GPUS_ON_NODE", "")}
    procs.append(subprocess.Popen(["ip", "netns", "exec", where[node], *args], env=env))
def stop(*_):
    for p in procs:
        p.terminate()
signal.signal(signal.SIGTERM, stop)
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
'''

SCONTROL = r'''#!/usr/bin/env bash
# A stand-in for `scontrol show hostnames LIST`: one name a line (LIST: comma-separated names).
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stand-in: only 'show hostnames'" >&2; exit 2; }
tr ',' '\n' <<< "$3"
'''


@pytest.fixture
def slurm_nodes(tmp_path):
    """Three "nodes" node0..node2 in namespaces PREFIX-s (10.77.0.1), PREFIX-c0, PREFIX-c1 on one bridge
    (deploy/netns-up.sh), each with a hosts file naming the others; stand-ins for srun and scontrol."""
    why = _netns_usable()
    if why is not None:
        pytest.skip(f"the Slurm script's test {why}")
    prefix = f"efs-{secrets.token_hex(2)}"
    where = {"node0": f"{prefix}-s", "node1": f"{prefix}-c0", "node2": f"{prefix}-c1"}
    hosts = "127.0.0.1 localhost\n10.77.0.1 node0\n10.77.1.1 node1\n10.77.1.2 node2\n"
    etc = pathlib.Path("/etc/netns")
    made_etc = not etc.exists()
    dirs = [etc / ns for ns in where.values()]
    try:
        subprocess.run([str(ROOT / "deploy" / "netns-up.sh"), prefix, "2"], check=True, capture_output=True)
        for d in dirs:  # `ip netns exec NS` mounts /etc/netns/NS/hosts on /etc/hosts for the command
            d.mkdir(parents=True)
            (d / "hosts").write_text(hosts)
        bin_ = tmp_path / "bin"
        bin_.mkdir()
        (bin_ / "srun").write_text(SRUN.replace("PYTHON", sys.executable))
        (bin_ / "scontrol").write_text(SCONTROL)
        for f in ("srun", "scontrol"):
            (bin_ / f).chmod(0o755)
        yield bin_, where
    finally:
        subprocess.run([str(ROOT / "deploy" / "netns-down.sh"), "--force", prefix], capture_output=True)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        if made_etc:
            try:
                etc.rmdir()
            except OSError:
                pass
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in out, out


@pytest.mark.slow
def test_the_slurm_script_runs_the_server_and_a_group_per_node(slurm_nodes, tmp_path):
    bin_, where = slurm_nodes
    report = tmp_path / "slurm.json"
    env = plain_env(
        PATH=f"{bin_}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node0,node1,node2", FAKE_SLURM_NETNS=",".join(f"{n}={ns}" for n, ns in where.items()),
        FAKE_SLURM_LOG=str(tmp_path / "srun.log"), FAKE_SLURM_GPUS_ON_NODE="2", SLURM_CPUS_ON_NODE="4",
        EFMUON_PYTHON=sys.executable,
        EFMUON_PORT="50123", EFMUON_WORKER_ARGS="--reconnect-timeout 60",
        EFMUON_SERVER_ARGS=" ".join([*TASK, "--insecure", "--report", str(report), "--plots", "none"]))
    job = subprocess.Popen(["bash", str(ROOT / "deploy" / "slurm" / "efmuon.sbatch")], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=120)
    finally:  # the job's process group: the stand-ins' steps, the server and the ranks
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    out = subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "server on node0:50123; 2 worker group(s) on node1,node2" in out.stdout, out.stdout
    for j, node in ((0, "node1"), (1, "node2")):
        assert f"client {j} on {node}: 2 rank(s)" in out.stdout, out.stdout
        assert f"worker {j}: 3 rounds" in out.stdout and "worker group rank 1: 4 gradients" in out.stdout
    steps = sorted(json.loads(line) for line in (tmp_path / "srun.log").read_text().splitlines())
    assert len(steps) == 2, steps  # two job steps: the server on the first node, the groups on the others
    server, groups = steps
    assert server[:3] == ["--nodes=1", "--ntasks=1", "--nodelist=node0"], server
    assert server[server.index("--workers") + 1] == "2" and "--reconnect-timeout" not in server, server
    assert groups[:6] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--nodelist=node1,node2",
                          "--cpus-per-task=4", "bash"], groups
    assert "-m efmuon.worker --reconnect-timeout 60" in groups[-1], groups
    s = json.loads(report.read_text())["summary"]
    assert s["rounds"] == 3 and s["workers"] == 2 and sorted(s["client_bytes"]) == ["0", "1"]
    assert s["final_loss_w"] < s["initial_loss"]


def test_the_readme_names_every_variable():
    p = argparse.ArgumentParser()
    add_worker_flags(p)
    readme = (ROOT / "README.md").read_text()
    assert [n for n in track(p) if f"`{n}`" not in readme] == []
    assert "deploy/slurm/efmuon.sbatch" in readme and "torchrun --standalone --nproc-per-node" in readme


def test_the_slurm_script_names_a_missing_allocation_or_too_few_nodes(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text(SCONTROL)
    (bin_ / "scontrol").chmod(0o755)
    script = str(ROOT / "deploy" / "slurm" / "efmuon.sbatch")
    env = plain_env(PATH=f"{bin_}:{os.environ['PATH']}")
    env.pop("SLURM_JOB_NODELIST", None)
    out = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 2 and "SLURM_JOB_NODELIST is not set: submit this with sbatch" in out.stderr, out.stderr
    out = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30,
                         env={**env, "SLURM_JOB_NODELIST": "node0"})
    assert out.returncode == 2 and "the allocation has 1 node(s): give at least 2" in out.stderr, out.stderr

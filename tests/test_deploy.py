"""deploy/: the container image, Compose, Kubernetes and systemd files stay in step with efmuon and each other.

Nothing here runs docker, kubectl or systemd. Every efmuon command line in the files (compose `command`,
the Kubernetes `args`, the systemd ExecStart, the Dockerfile's ENTRYPOINT + CMD) goes through efmuon's own
argument parser; every EFMUON_* variable must name an `efmuon worker` flag (EFMUON_CLIENT_ID ->
--client-id) and the worker's command line those variables make must parse too; ports, secret and volume
paths and the certificate files must agree across the files and with what `efmuon certs` writes; the
Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate, offline). The probe
(deploy/healthcheck.py, the image's efmuon-healthcheck) and --auto-resume run for real against a server.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from efmuon.cli import build_parser
from efmuon.common.shards import parse_shard
from efmuon.server.certs import make_dev_certs
from conftest import CLI, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GRPC_PORT, METRICS_PORT = 50051, 9100


def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("efmuon_healthcheck", DEPLOY / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HEALTHCHECK = _load_healthcheck()


# ---------------------------------------------------------------------------------------------- helpers
def parse_efmuon(argv: list[str]) -> argparse.Namespace:
    """argv (without the program) through efmuon's parser; a refusal fails the test with argparse's words."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return build_parser().parse_args(argv)
        except SystemExit as exc:
            if exc.code == 0:  # --help
                return argparse.Namespace(command=None, help=True)
            pytest.fail(f"efmuon {shlex.join(argv)} is refused by efmuon's parser: {err.getvalue().strip()}")


def parse_healthcheck(argv: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return HEALTHCHECK.build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"efmuon-healthcheck {shlex.join(argv)} is refused: {err.getvalue().strip()}")


def worker_options() -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return {s: a for a in sub.choices["worker"]._actions for s in a.option_strings}  # noqa: SLF001


def env_flag(name: str) -> str:
    """EFMUON_TOKEN_FILE -> --token-file (the convention of the worker's environment variables)."""
    assert name.startswith("EFMUON_") and name == name.upper(), name
    return "--" + name[len("EFMUON_"):].lower().replace("_", "-")


def worker_argv(command: list[str], env: dict[str, str]) -> list[str]:
    """The worker command line that `command` plus the EFMUON_* variables stand for."""
    options = worker_options()
    argv = list(command)
    for name, value in env.items():
        if not name.startswith("EFMUON_"):
            continue
        flag = env_flag(name)
        assert flag in options, f"{name} names no `efmuon worker` flag ({flag}); flags: {sorted(options)}"
        if options[flag].nargs == 0:  # a switch: on for a true value
            argv += [flag] if str(value).lower() in ("1", "true", "yes", "on") else []
        else:
            argv += [flag, str(value)]
    return argv


def efmuon_in_shell(script: str) -> list[list[str]]:
    """The argument lists of every `efmuon ...` command in a shell line (up to ; && || |)."""
    words, out, cur = shlex.split(script), [], None
    for w in words:
        if cur is not None and w in (";", "&&", "||", "|"):
            out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(w)
        elif Path(w).name == "efmuon":
            cur = []
    return out + ([cur] if cur is not None else [])


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def under(path: str, mount: str) -> bool:
    return Path(path).is_relative_to(mount)


def cert_names(pem: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)) | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def made_certs(tmp_path: Path, argv: list[str]) -> Path:
    """Run the `efmuon certs` of a file (its DIR moved under tmp_path) and return the directory."""
    args = parse_efmuon(argv)
    assert args.command == "certs"
    d = tmp_path / "certs"
    make_dev_certs(str(d), hosts=tuple(args.host), clients=args.clients, tokens=not args.no_tokens,
                   days=args.days, stream=io.StringIO())
    return d


# ---------------------------------------------------------------------------------------------- Dockerfile
def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def dockerignore_passes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' lets a path (and what is under it) through."""
    keep = True
    for pat in (ROOT / ".dockerignore").read_text().splitlines():
        pat = pat.strip()
        if not pat or pat.startswith("#"):
            continue
        negate, pat = pat.startswith("!"), pat.lstrip("!")
        parts = Path(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            keep = negate
    return keep


def test_dockerfile_installs_every_package_with_efmuon_as_its_entry_point():
    # Prepare
    steps = dockerfile()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copies = [s.split() for k, s in steps if k == "COPY"]
    sources = {src for c in copies for src in c[:-1] if not src.startswith("--")}

    # Execute
    entrypoint = json.loads(next(s for k, s in steps if k == "ENTRYPOINT"))
    cmd = json.loads(next(s for k, s in steps if k == "CMD"))

    # Assert: efmuon is the entry point, and its default command parses
    assert entrypoint == ["efmuon"]
    parse_efmuon(cmd)
    # every package folder of pyproject (and the files setuptools reads) is copied, and .dockerignore lets
    # each copied path through while it keeps the tests out
    folders = {d.split("/")[0] for d in packages.values()}
    assert folders | {"pyproject.toml", "README.md"} <= sources, folders - sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
        assert dockerignore_passes(src), f".dockerignore keeps out {src}, which the Dockerfile copies"
    assert not dockerignore_passes("tests/test_deploy.py") and not dockerignore_passes(".git")
    assert not dockerignore_passes("common/__pycache__/x.pyc")
    # the CPU default and the CUDA variant are build arguments; the probe the manifests call is installed
    args = {s.split("=")[0] for k, s in steps if k == "ARG"}
    assert {"BASE", "TORCH_INDEX", "TORCH"} <= args
    assert ["deploy/healthcheck.py", "/usr/local/bin/efmuon-healthcheck"] in copies
    exposed = {int(p) for k, s in steps if k == "EXPOSE" for p in s.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}
    assert next(s for k, s in steps if k == "USER") == "10001:10001"


# ---------------------------------------------------------------------------------------------- Compose
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_argv(service: dict) -> list[list[str]]:
    """The efmuon command lines a compose service runs (the image's ENTRYPOINT is efmuon)."""
    entry, command = service.get("entrypoint"), service.get("command") or []
    if entry is None:
        return [list(command)]
    assert entry == ["sh", "-c"], entry
    return [argv for line in command for argv in efmuon_in_shell(line)]


def mounts(service: dict) -> dict[str, str]:
    """mount path -> volume name"""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose_server_workers_certs_and_health_check_agree(compose, tmp_path):
    # Prepare
    services = compose["services"]
    server, certs = services["server"], services["certs"]
    workers = {name: s for name, s in services.items() if name.startswith("worker")}

    # Execute: every efmuon command line through efmuon's parser
    (server_argv,) = compose_argv(server)
    (certs_argv,) = compose_argv(certs)
    parse_efmuon(server_argv)
    worker_lines = {name: worker_argv(compose_argv(w)[0], w["environment"]) for name, w in workers.items()}
    parsed = {name: parse_efmuon(argv) for name, argv in worker_lines.items()}
    made = made_certs(tmp_path, certs_argv)

    # Assert: N workers, client ids 0..N-1, each with its own token, as many as the server waits for
    n = int(flag(server_argv, "--workers"))
    assert len(workers) == n == int(flag(certs_argv, "--clients"))
    assert sorted(a.client_id for a in parsed.values()) == list(range(n))
    for a in parsed.values():
        assert a.command == "worker"
        assert Path(a.token_file).name == f"client-{a.client_id}.token"
    # ports: the server's --port == the workers' --server port == the health check's == the published one
    port = int(flag(server_argv, "--port"))
    assert port == GRPC_PORT and f"{port}:{port}" in server["ports"]
    assert f"{METRICS_PORT}:{flag(server_argv, '--metrics-port')}" in server["ports"]
    probe = server["healthcheck"]["test"]
    assert probe[:2] == ["CMD", "efmuon-healthcheck"]
    probed = parse_healthcheck(probe[2:])
    assert host_port(probed.address)[1] == port
    for a in parsed.values():
        host, wport = host_port(a.server)
        assert wport == port and host == "server" and host in services
        assert a.tls_ca and a.tls_ca == probed.tls_ca  # TLS on: the workers trust the CA the probe trusts
    # volumes: certificates and tokens from the certs volume, which `efmuon certs` fills; state on its own
    certs_dir = flag(server_argv, "--tls-cert").rsplit("/", 1)[0]
    assert certs_argv[1] == certs_dir and mounts(certs)[certs_dir] == "certs" == mounts(server)[certs_dir]
    for f in ("--tls-cert", "--tls-key", "--token-file"):
        assert (made / Path(flag(server_argv, f)).name).is_file() and under(flag(server_argv, f), certs_dir)
    for name, a in parsed.items():
        assert mounts(workers[name])[certs_dir] == "certs"
        for path in (a.tls_ca, a.token_file):
            assert under(path, certs_dir) and (made / Path(path).name).is_file(), path
    assert under(probed.tls_ca, certs_dir) and (made / Path(probed.tls_ca).name).is_file()
    state = next(m for m, v in mounts(server).items() if v == "state")
    assert under(flag(server_argv, "--checkpoint-dir"), state) and under(flag(server_argv, "--report"), state)
    assert set(compose["volumes"]) == {"certs", "state"}
    # the server certificate names the host the workers dial and the one the probe dials
    assert {"server", host_port(probed.address)[0]} <= cert_names(made / "server.pem")
    # start order: certs, then the server, then the workers once the server's health check passes
    assert server["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert all(w["depends_on"]["server"]["condition"] == "service_healthy" for w in workers.values())
    assert "--auto-resume" in server_argv and server["restart"] == "on-failure"


# ---------------------------------------------------------------------------------------------- Kubernetes
@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def find(k8s, kind: str, name: str) -> dict:
    return next(d for docs in k8s.values() for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def container_argv(c: dict) -> list[str]:
    """What a container runs, with the image's ENTRYPOINT (efmuon) when it gives only args."""
    if "command" in c:
        assert Path(c["command"][0]).name == "efmuon", c["command"]
        return list(c["command"][1:]) + list(c.get("args", []))
    return list(c["args"])


def probe_argv(probe: dict) -> list[str]:
    command = probe["exec"]["command"]
    assert command[0] == "efmuon-healthcheck"
    return command[1:]


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas(k8s):
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    docs = [d for ds in k8s.values() for d in ds]
    assert {d["kind"] for d in docs} == {"Service", "PersistentVolumeClaim", "Job"}
    for d in docs:
        kv.validate(d, version, strict=True)  # raises ValidationError naming the field
    # a negative control: the validator does reject a field the schema does not have
    bad = json.loads(json.dumps(find(k8s, "Job", "efmuon-server")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"] = {"port": GRPC_PORT, "tls": True}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def server_and_workers(docs: dict, service_name: str) -> tuple:
    """(the Service, the server Job, the workers Job, the server's pod template, its container, the workers'
    container) of a set of manifests: the Jobs efmuon-server and efmuon-workers, one container each."""
    service = find(docs, "Service", service_name)
    server_job, workers_job = find(docs, "Job", "efmuon-server"), find(docs, "Job", "efmuon-workers")
    pod = server_job["spec"]["template"]
    (server_c,) = pod["spec"]["containers"]
    (worker_c,) = workers_job["spec"]["template"]["spec"]["containers"]
    return service, server_job, workers_job, pod, server_c, worker_c


def test_kubernetes_server_service_and_indexed_workers_agree(k8s, tmp_path):
    # Prepare
    service, server_job, workers_job, pod, server_c, worker_c = server_and_workers(k8s, "efmuon-server")
    index_env = next(e for e in worker_c["env"] if e["name"] == "EFMUON_CLIENT_ID")

    # Execute: the server's args and each worker's (index J) through efmuon's parser
    server_argv = container_argv(server_c)
    server_args = parse_efmuon(server_argv)
    n = workers_job["spec"]["completions"]

    def worker_env(j: int) -> dict[str, str]:
        env = {}
        for e in worker_c["env"]:  # Kubernetes expands $(NAME) from the variables above it
            env[e["name"]] = str(j) if e is index_env else re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], e["value"])
        return env

    workers = [parse_efmuon(worker_argv(container_argv(worker_c), worker_env(j))) for j in range(n)]
    comments = (DEPLOY / "k8s" / "server.yaml").read_text()
    certs_line = next(line for line in comments.splitlines() if "efmuon certs" in line).lstrip("# ")
    made = made_certs(tmp_path, shlex.split(certs_line)[1:])

    # Assert: an Indexed Job whose completion index is the client id, as many as the server waits for
    assert workers_job["spec"]["completionMode"] == "Indexed"
    assert n == workers_job["spec"]["parallelism"] == server_args.workers
    assert index_env["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert [w.client_id for w in workers] == list(range(n))
    # ports: Service port == the container port it targets == --port == the probes' port == the workers' port
    ports = {p["name"]: p for p in server_c["ports"]}
    for sp in service["spec"]["ports"]:
        assert sp["port"] == ports[sp["targetPort"]]["containerPort"]
    assert ports["grpc"]["containerPort"] == server_args.port == GRPC_PORT
    assert ports["metrics"]["containerPort"] == server_args.metrics_port == METRICS_PORT
    probes = [server_c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    for probe in probes:
        assert host_port(parse_healthcheck(probe_argv(probe)).address)[1] == server_args.port
    for w in workers:
        assert host_port(w.server) == (service["metadata"]["name"], server_args.port)
    # the Service selects the server's pods (and only those)
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= workers_job["spec"]["template"]["metadata"]["labels"].items()
    # secrets: each file a command names lies under a mounted secret that holds it (the kubectl create lines)
    secret_files = {m[1]: set(re.findall(r"--from-file=\S*?([\w.-]+)(?=\s|\\|$)", m[2])) for m in re.finditer(
        r"kubectl create secret generic (\S+)((?:[^\n]*\\\n)*[^\n]*)", comments.replace("#   ", ""))}

    def secret_of(c, volumes, path):
        for m in c["volumeMounts"]:
            if under(path, m["mountPath"]):
                vol = next(v for v in volumes if v["name"] == m["name"])
                return vol["secret"]["secretName"]
        pytest.fail(f"{path} is on no mounted volume of {c['name']}")

    server_volumes = pod["spec"]["volumes"]
    for path in [server_args.tls_cert, server_args.tls_key, server_args.token_file] + [
            parse_healthcheck(probe_argv(p)).tls_ca for p in probes]:
        name = secret_of(server_c, server_volumes, path)
        assert Path(path).name in secret_files[name] and (made / Path(path).name).is_file(), path
    worker_volumes = workers_job["spec"]["template"]["spec"]["volumes"]
    for w in workers:
        for path in (w.tls_ca, w.token_file):
            name = secret_of(worker_c, worker_volumes, path)
            assert Path(path).name in secret_files[name] and (made / Path(path).name).is_file(), path
    assert "server.key" not in set().union(*(secret_files[v["secret"]["secretName"]] for v in worker_volumes))
    # checkpoints and the report on the claim; the certificate names the Service and the probes' host
    state = next(m["mountPath"] for m in server_c["volumeMounts"] if m["name"] == "state")
    assert under(server_args.checkpoint_dir, state) and under(server_args.report, state)
    claim = next(v for v in server_volumes if v["name"] == "state")["persistentVolumeClaim"]["claimName"]
    find(k8s, "PersistentVolumeClaim", claim)
    assert {service["metadata"]["name"], "localhost"} <= cert_names(made / "server.pem")
    assert server_args.auto_resume and pod["spec"]["restartPolicy"] == "OnFailure"


def k8s_sharded() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted((DEPLOY / "k8s" / "sharded").glob("*.yaml"))}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(NAME) expansion of args, env values and subPathExpr."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], text)


def test_kubernetes_sharded_servers_headless_service_and_workers_agree(k8s, tmp_path):
    # Prepare: the sharded manifests (an Indexed Job of shard servers behind a headless Service)
    docs = k8s_sharded()
    sharded = {"sharded/" + name: ds for name, ds in docs.items()}
    service, servers, workers_job, pod, server_c, worker_c = server_and_workers(sharded, "efmuon-shards")
    shard_env = next(e for e in server_c["env"] if e["name"] == "SHARD")
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    kv = pytest.importorskip("kubernetes_validate")
    for d in (d for ds in docs.values() for d in ds):
        kv.validate(d, kv.latest_version(), strict=True)

    # Execute: every shard's command line (its completion index expanded) and every worker's through the parser
    n = servers["spec"]["completions"]
    shard_args = [parse_efmuon([expand(a, {"SHARD": str(i)}) for a in container_argv(server_c)]) for i in range(n)]
    state_mount = next(m for m in server_c["volumeMounts"] if m["name"] == "state")
    shard_dirs = [Path(state_mount["mountPath"]) / expand(state_mount["subPathExpr"], {"SHARD": str(i)})
                  for i in range(n)]
    n_workers = workers_job["spec"]["completions"]
    worker_env = {}
    workers = []
    for j in range(n_workers):
        env = {}
        for e in worker_c["env"]:
            env[e["name"]] = str(j) if "valueFrom" in e else expand(e["value"], env)
        workers.append(parse_efmuon(worker_argv(container_argv(worker_c), env)))
        worker_env = env
    comments = (DEPLOY / "k8s" / "sharded" / "servers.yaml").read_text()
    certs_line = next(line for line in comments.splitlines() if "efmuon certs" in line).lstrip("# ")
    made = made_certs(tmp_path, shlex.split(certs_line)[1:])

    # Assert: shard I of N is the pod of completion index I, one per index, all of one run
    assert servers["spec"]["completionMode"] == "Indexed" and servers["spec"]["parallelism"] == n >= 2
    assert shard_env["valueFrom"]["fieldRef"]["fieldPath"] == index
    assert [parse_shard(a.shard) for a in shard_args] == [(i, n) for i in range(n)]
    assert all(a.workers == n_workers == workers_job["spec"]["parallelism"] for a in shard_args)
    single = container_argv(find(k8s, "Job", "efmuon-server")["spec"]["template"]["spec"]["containers"][0])
    for key in ("--port", "--workers", "--task", "--rounds", "--uplink", "--downlink", "--checkpoint-every"):
        assert flag(container_argv(server_c), key) == flag(single, key), key  # the same run as the unsharded file
    assert "--save-model" not in container_argv(server_c)
    # every shard has a stable name <job>-<index>.<headless Service>, and the workers name them all in shard order
    assert service["spec"]["clusterIP"] == "None" and pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= workers_job["spec"]["template"]["metadata"]["labels"].items()
    port = shard_args[0].port
    names = [f"{servers['metadata']['name']}-{i}.{service['metadata']['name']}" for i in range(n)]
    assert all(w.server == ",".join(f"{h}:{port}" for h in names) for w in workers), worker_env["EFMUON_SERVER"]
    assert [w.client_id for w in workers] == list(range(n_workers))
    ports = {p["name"]: p["containerPort"] for p in server_c["ports"]}
    assert ports["grpc"] == port and all(sp["port"] == ports[sp["targetPort"]] for sp in service["spec"]["ports"])
    # the one certificate names every shard; checkpoints and reports are per shard, on one shared claim
    assert set(names) <= cert_names(made / "server.pem")
    assert len(set(shard_dirs)) == n
    assert all(under(a.checkpoint_dir, state_mount["mountPath"]) and under(a.report, state_mount["mountPath"])
               for a in shard_args)
    claim = find(sharded, "PersistentVolumeClaim", pod["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert all(a.auto_resume for a in shard_args) and pod["spec"]["restartPolicy"] == "OnFailure"
    merge = next(line for line in comments.splitlines() if "efmuon report merge" in line).lstrip("# ")
    merge_args = parse_efmuon(shlex.split(merge)[1:])
    assert sorted(merge_args.reports) == [f"shard-{i}/report.json" for i in range(n)]
    assert all(Path(a.report).name == "report.json" for a in shard_args)


# ---------------------------------------------------------------------------------------------- systemd
def unit() -> dict[str, dict[str, str]]:
    sections, cur = {}, None
    text = re.sub(r"\\\n", " ", (DEPLOY / "efmuon-server.service").read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            cur = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            cur[key] = value
    return sections


def test_systemd_unit_runs_a_dedicated_user_server_that_resumes_after_a_failure():
    # Prepare
    service = unit()["Service"]

    # Execute
    argv = shlex.split(service["ExecStart"])
    args = parse_efmuon(argv[1:])

    # Assert
    assert Path(argv[0]).name == "efmuon" and args.command == "server"
    assert service["Restart"] == "on-failure" and service["User"] not in ("", "root")
    assert args.auto_resume and args.checkpoint_every == 1
    state = f"/var/lib/{service['StateDirectory']}"
    assert under(args.checkpoint_dir, state) and under(args.report, state) and service["WorkingDirectory"] == state
    assert args.port == GRPC_PORT and args.metrics_port == METRICS_PORT
    assert "130" in service["SuccessExitStatus"].split()  # SIGTERM (systemctl stop) checkpoints and exits 130
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_every_efmuon_flag_a_deploy_file_gives_the_server_is_the_same_everywhere(compose, k8s):
    # the run itself (task, workers, rounds, compression, checkpoints, TLS, metrics) is one run in every file
    lines = {"compose": compose_argv(compose["services"]["server"])[0],
             "k8s": container_argv(find(k8s, "Job", "efmuon-server")["spec"]["template"]["spec"]["containers"][0]),
             "systemd": shlex.split(unit()["Service"]["ExecStart"])[1:]}
    keys = ("--port", "--workers", "--task", "--rounds", "--uplink", "--downlink", "--checkpoint-every",
            "--metrics-port")
    values = {where: {k: flag(argv, k) for k in keys} for where, argv in lines.items()}
    assert values["compose"] == values["k8s"] == values["systemd"], values
    for argv in lines.values():
        assert {"--auto-resume", "--tls-cert", "--tls-key", "--token-file"} <= set(argv)
        assert "--insecure" not in argv


# ---------------------------------------------------------------------------------------------- for real
@pytest.mark.slow
def test_the_probe_and_auto_resume_against_a_real_tls_server(tmp_path):
    # Prepare: certificates as the deploy files make them, a TLS + token server that waits for its workers
    certs = tmp_path / "certs"
    make_dev_certs(str(certs), hosts=("localhost",), clients=1, stream=io.StringIO())
    port, ckpt = free_port(), tmp_path / "ckpt"
    flags = ["--task", "lsq", "--workers", "1", "--rounds", "3", "--plots", "none", "--checkpoint-dir", str(ckpt),
             "--checkpoint-every", "1", "--auto-resume", "--tls-cert", str(certs / "server.pem"),
             "--tls-key", str(certs / "server.key"), "--token-file", str(certs / "tokens.txt")]
    log = tmp_path / "server.log"
    server = subprocess.Popen(CLI + ["server", "--host", "127.0.0.1", "--port", str(port), *flags,
                                     "--report", str(tmp_path / "a.json")], stdout=open(log, "w"),
                              stderr=subprocess.STDOUT)
    probe = [sys.executable, str(DEPLOY / "healthcheck.py"), "--timeout", "2"]
    try:
        # Execute: probe until it serves (it is WAITING for its worker), then without the CA
        deadline = time.monotonic() + 60
        while True:
            ok = subprocess.run(probe + ["--tls-ca", str(certs / "ca.pem"), f"localhost:{port}"],
                                capture_output=True, text=True, timeout=30)
            if ok.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.2)
        plain = subprocess.run(probe + [f"localhost:{port}"], capture_output=True, text=True, timeout=30)
        unknown = subprocess.run(probe + ["--tls-ca", str(certs / "ca.pem"), "--service", "no.such.Service",
                                          f"localhost:{port}"], capture_output=True, text=True, timeout=30)
        worker = subprocess.run(CLI + ["worker", "--server", f"localhost:{port}", "--client-id", "0", "--tls-ca",
                                       str(certs / "ca.pem"), "--token-file", str(certs / "client-0.token"),
                                       "--quiet"], capture_output=True, text=True, timeout=120)
        assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
        # ... and the same command again: --auto-resume continues the checkpointed run (here: it is done)
        again = subprocess.run(CLI + ["server", "--host", "127.0.0.1", "--port", str(free_port()), *flags,
                                      "--report", str(tmp_path / "b.json")], capture_output=True, text=True,
                               timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    # Assert
    assert ok.returncode == 0 and ok.stdout.strip() == f"localhost:{port}: SERVING", (ok.stderr, log.read_text())
    assert plain.returncode == 2 and "UNAVAILABLE" in plain.stderr  # TLS server, plaintext probe
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    assert worker.returncode == 0, worker.stderr
    assert again.returncode == 0, again.stderr
    assert "--auto-resume" in again.stderr and "resuming" in again.stderr
    a, b = (json.loads((tmp_path / f"{x}.json").read_text())["summary"] for x in "ab")
    assert a["w_sha256"] == b["w_sha256"] and b["rounds"] == 3


def test_auto_resume_refuses_what_it_cannot_do(tmp_path):
    base = ["server", "--host", "127.0.0.1", "--port", "0", "--task", "lsq", "--auto-resume"]
    no_dir = subprocess.run(CLI + base, capture_output=True, text=True, timeout=60)
    both = subprocess.run(CLI + base + ["--checkpoint-dir", str(tmp_path), "--fresh"], capture_output=True,
                          text=True, timeout=60)
    assert no_dir.returncode == 2 and "give --checkpoint-dir DIR" in no_dir.stderr
    assert both.returncode == 2 and "without --fresh" in both.stderr
    assert "Traceback" not in no_dir.stderr + both.stderr

"""The package's import graph, read from the source (ast): one direction of dependency, no cycles.

    common  <-  server, worker, simulate  <-  cli      (benchmarks sit beside cli, above everything)

`common` imports neither server nor worker; server and worker never import each other; nothing below
the CLI imports it or the benchmarks. An import inside a function is allowed only in the CLI (each
command's driver is loaded when the command runs) or where the line says `# lazy:` and why (an
optional heavy dependency such as matplotlib); never to dodge a cycle, since there are none.
"""
from __future__ import annotations

import ast
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("common", "server", "worker", "simulate", "cli", "benchmarks")
# what each layer may import (besides itself and the generated efmuon.v1)
ALLOWED = {
    "common": {"common"},
    "server": {"common", "server"},
    "worker": {"common", "worker"},
    "simulate": {"common", "simulate"},
    "cli": set(PACKAGES) - {"benchmarks"} | {"benchmarks"},
    "benchmarks": set(PACKAGES) - {"cli"},
}
ENTRY_POINTS = {"efmuon.worker.__main__"}  # like the `efmuon` script: an entry point may import the CLI


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["efmuon", *parts])


@functools.cache
def modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(p)] = p
    return out


def resolve(mod: str, path: pathlib.Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The efmuon modules (or packages) one import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("efmuon.")]
    if node.level:
        base = mod.split(".")
        if path.name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("efmuon."):
        return []
    # `from .x import y` imports the module efmuon...x.y when y is one, else the names of efmuon...x
    subs = [f"{target}.{a.name}" for a in node.names]
    mods = modules()
    return [s for s in subs if s in mods] if all(s in mods for s in subs) else [target]


def graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    inner: list[tuple[str, int, str]] = []
    for mod, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        in_function, type_only = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                type_only |= {id(s) for s in ast.walk(node)}  # annotations only: not an import at run time
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function |= {id(s) for s in ast.walk(node) if s is not node}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in type_only:
                continue
            targets = [t for t in resolve(mod, path, node) if t in mods and t != mod]
            if not targets:
                continue
            edges[mod] |= set(targets)
            if id(node) in in_function:
                inner.append((mod, node.lineno, lines[node.end_lineno - 1]))
    return edges, inner


def layer(mod: str) -> str:
    return mod.split(".")[1]


def test_no_import_cycles():
    edges, _ = graph()
    # Tarjan's strongly connected components
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_only_downwards():
    edges, _ = graph()
    bad = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                 if a not in ENTRY_POINTS and layer(b) not in ALLOWED[layer(a)])
    assert not bad, "imports against the layering (common <- server, worker, simulate <- cli):\n" + "\n".join(bad)


def test_function_level_imports_are_only_lazy_ones():
    _, inner = graph()
    bad = [f"{m}:{n}: {line.strip()}" for m, n, line in inner
           if layer(m) != "cli" and "# lazy:" not in line and m not in ENTRY_POINTS]
    assert not bad, ("imports inside functions (hoist them, or mark an optional heavy dependency "
                     "with '# lazy: why'):\n" + "\n".join(bad))


def test_the_graph_is_read():
    """The walk itself works: it sees the edges everybody knows are there."""
    edges, _ = graph()
    assert "efmuon.common.algorithm" in edges["efmuon.server.coordinator"] or any(
        e.startswith("efmuon.common.algorithm") for e in edges["efmuon.server.coordinator"])
    assert any(layer(e) == "common" for e in edges["efmuon.worker.client"])
    assert any(layer(e) == "server" for e in edges["efmuon.cli.service"]) or any(
        layer(e) == "server" for e in edges["efmuon.cli"])

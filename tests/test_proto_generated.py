"""The committed generated code under proto/efmuon/v1/ is what proto/generate.sh produces now."""
from __future__ import annotations

import pathlib
import subprocess

import pytest

pytest.importorskip("grpc_tools")

PROTO = pathlib.Path(__file__).resolve().parents[1] / "proto"
GENERATED = sorted(p.name for p in (PROTO / "efmuon" / "v1").glob("*_pb2*.py*"))


def test_generated_files_exist():
    # Assert
    assert {"service_pb2.py", "service_pb2.pyi", "service_pb2_grpc.py"} <= set(GENERATED)


def test_committed_generated_code_is_fresh(tmp_path):
    # Execute
    subprocess.run(["sh", str(PROTO / "generate.sh"), str(tmp_path)], check=True, capture_output=True, text=True)

    # Assert
    fresh = sorted(p.name for p in (tmp_path / "efmuon" / "v1").glob("*_pb2*.py*"))
    assert fresh == GENERATED, "generated file set changed: run proto/generate.sh and commit the result"
    for name in GENERATED:
        committed = (PROTO / "efmuon" / "v1" / name).read_text()
        regenerated = (tmp_path / "efmuon" / "v1" / name).read_text()
        assert committed == regenerated, f"proto/efmuon/v1/{name} is stale: run proto/generate.sh and commit it"


def test_generated_imports_need_no_fixups():
    # Assert: the include root is proto/, so the stubs import the installed package efmuon.v1
    text = (PROTO / "efmuon" / "v1" / "service_pb2_grpc.py").read_text()
    assert "from efmuon.v1 import service_pb2" in text
    from efmuon.v1 import service_pb2, service_pb2_grpc  # noqa: F401


def test_every_field_and_message_is_commented():
    """A client in another language is written from the .proto alone: each field and message has a comment."""
    import re

    lines = (PROTO / "efmuon" / "v1" / "service.proto").read_text().splitlines()
    decl = re.compile(r"^\s+(optional |repeated )?[A-Za-z0-9_.]+ [a-z_0-9]+ = \d+;")
    undocumented = [line.strip() for i, line in enumerate(lines)
                    if decl.match(line) and not lines[i - 1].strip().startswith("//")]
    assert not undocumented, f"fields without a comment line above them: {undocumented}"
    bare = [line for i, line in enumerate(lines)
            if re.match(r"^(message|enum|service) \w+", line) and not lines[i - 1].startswith("//")]
    assert not bare, f"messages without a comment line above them: {bare}"

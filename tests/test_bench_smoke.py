"""Smoke tests of every `efmuon bench NAME --quick` through run_bench: structure only, never timings
(the machine is shared and noisy)."""
import json

import pytest
from efmuon.benchmarks import run_bench


@pytest.mark.parametrize("name", ["codecs", "lmo", "transport", "scaling", "memory"])
def test_bench_quick_structure(name, tmp_path):
    report = tmp_path / f"{name}.json"
    md = tmp_path / "BENCHMARKS.md"
    out = run_bench(name, True, str(report), str(md), f"efmuon bench {name} --quick")
    data = json.loads(report.read_text())
    assert data["bench"] == name and data["quick"] is True
    assert data["goals"], "goals list is empty"
    for g in data["goals"]:
        assert set(g) == {"name", "value", "goal", "met"}
        assert isinstance(g["met"], bool)
    assert out["table"].strip() and "|---|" in out["table"]
    assert data["result"]
    text = md.read_text()
    assert f"<!-- bench:{name} -->" in text and f"<!-- /bench:{name} -->" in text

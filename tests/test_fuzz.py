"""Fault injection and fuzzing (tests/faults.py): damaged models, malformed pipelines/recipes/options,
recompiles interrupted by SIGINT and SIGKILL. A bounded subset runs by default; `pytest -m slow`
runs hundreds of cases (benchmarks/fuzz.py prints the table in docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.errors import LlmoptError, PipelineError
from llmopt.core.pipeline import parse

HARNESS = Path(__file__).with_name("faults.py")


def run_harness(model: Path, tmp_path: Path, **cases) -> dict:
    out = tmp_path / "faults.json"
    args = [f"--{k}={v}" for k, v in cases.items()]
    res = subprocess.run([sys.executable, str(HARNESS), str(model), *args, "--json", str(out)],
                         capture_output=True, text=True, timeout=3000)
    result = json.loads(out.read_text())
    assert res.returncode == (1 if result["bad"] else 0), res.stderr[-3000:]
    return result


def check(result: dict, expected_cases: dict[str, int]) -> None:
    table = result["table"]
    for kind, n in expected_cases.items():
        rows = [row for k, row in table.items() if k.startswith(kind)]
        assert sum(r["cases"] for r in rows) == n, table
    assert result["bad"] == [], json.dumps(result["bad"], indent=1)[:4000]
    for row in table.values():
        assert row["tracebacks"] == row["not one line"] == row["inputs modified"] == 0
        assert row["partial outputs"] == row["previous artifacts lost"] == 0
    damaged = table["damaged model"]
    assert damaged["exit 2"] >= damaged["cases"] // 2  # most damage is refused at load, in one line


def test_fault_subset(exported, tmp_path):
    result = run_harness(exported("llama", True), tmp_path, damaged=17, pipeline=12, interrupt=4, seed=0)
    check(result, {"damaged model": 17, "malformed pipeline": 12, "interrupted recompile": 4})
    sigint = result["table"].get("interrupted recompile (SIGINT)", {})
    assert sigint.get("cases") == 2


@pytest.mark.slow
def test_fault_sweep(exported, tmp_path):
    result = run_harness(exported("llama", True), tmp_path, damaged=340, pipeline=200, interrupt=60, seed=1)
    check(result, {"damaged model": 340, "malformed pipeline": 200, "interrupted recompile": 60})


ALPHABET = st.sampled_from(list("abcdefkqrsuvwxyz-_=,;{}()0123456789.") + [" ", "fold", "fixpoint", "cleanup",
                                                                            "quantize-dynamic", "block_size", "max_iterations"])


@settings(max_examples=400, deadline=None)
@given(st.lists(ALPHABET, max_size=30).map("".join))
def test_pipeline_strings_parse_or_say_where(text):
    try:
        pipeline = parse(text)
    except PipelineError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert parse(str(pipeline)) == pipeline  # what parses prints back as itself
    try:
        pipeline.validate()  # unknown passes and options: one-line errors, nothing else
    except LlmoptError as exc:
        assert "\n" not in str(exc)

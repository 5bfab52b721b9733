"""`llmopt compare`: two real artifacts (fp32 and int8 of the tiny llama) side by side."""

from __future__ import annotations

import copy
import json

import pytest

from llmopt.reporting.compare import compare_artifacts, compare_reports, format_compare
from llmopt.compiler.driver import compile
from llmopt.errors import InputError


@pytest.fixture(scope="module")
def arts(exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    src = exported("llama", True)
    return (compile(src, "cpu-fp32", root / "fp32", measure_speed=False),
            compile(src, "cpu-int8", root / "int8", measure_speed=False))


def rows_by_label(result):
    return {r["label"]: r for r in result["rows"]}


def test_int8_vs_fp32(arts):
    fp32, int8 = arts
    a, b = fp32.report, int8.report
    result = compare_reports(a, b)
    rows = rows_by_label(result)
    assert rows["target"]["a"] == "cpu-fp32" and rows["target"]["b"] == "cpu-int8" and rows["target"]["same"] is False
    assert rows["pipeline"]["same"] is False and "quantize" in rows["pipeline"]["b"]
    assert rows["source sha256"]["same"] is True
    size = rows["artifact bytes"]
    assert size["a"] == a["artifact"]["bytes"] and size["b"] == b["artifact"]["bytes"]
    assert 0 < size["ratio"] < 1  # int8 weights are smaller
    assert size["ratio"] == pytest.approx(b["artifact"]["bytes"] / a["artifact"]["bytes"], rel=1e-5)
    assert rows["size ratio vs source"]["delta"] < 0
    assert rows["nodes"]["delta"] == b["artifact"]["nodes"] - a["artifact"]["nodes"]
    assert rows["KV cache bytes/token"]["a"] == a["kv_cache"]["bytes_per_token"]
    assert rows["warnings"]["delta"] == len(b["warnings"]) - len(a["warnings"])
    for key in a["verification"]["figures"]:
        assert rows[f"verify {key}"]["a"] == a["verification"]["figures"][key]
    assert rows["verify cosine"]["delta"] <= 0  # int8 is no closer to the source than fp32
    assert rows["single-token speedup"]["a"] is None  # compiled without speed measurement

    # op diff: exactly the ops whose counts differ, read from the manifests
    ops_a, ops_b = a["artifact"]["ops"], b["artifact"]["ops"]
    differ = {op for op in set(ops_a) | set(ops_b) if ops_a.get(op, 0) != ops_b.get(op, 0)}
    assert {r["op"] for r in result["ops"]} == differ
    by_op = {r["op"]: r for r in result["ops"]}
    new_in_int8 = [op for op in ops_b if op not in ops_a]
    assert new_in_int8, "the int8 artifact has a quantized op the fp32 one lacks"
    assert any("MatMul" in op for op in new_in_int8)  # a quantized MatMul kernel (MatMulNBits, MatMulInteger ...)
    for op in new_in_int8:
        assert by_op[op] == {"op": op, "a": 0, "b": ops_b[op], "delta": ops_b[op]}
    deltas = [abs(r["delta"]) for r in result["ops"]]
    assert deltas == sorted(deltas, reverse=True)
    json.dumps(result)  # --json ready


def test_format_compare_side_by_side(arts):
    fp32, int8 = arts
    text = format_compare("fp32-art", fp32.report, "int8-art", int8.report)
    lines = text.splitlines()
    assert "A: fp32-art" in lines[0] and "B: int8-art" in lines[0] and "B vs A" in lines[0]
    size = next(line for line in lines if line.startswith("artifact bytes"))
    ratio = int8.report["artifact"]["bytes"] / fp32.report["artifact"]["bytes"]
    assert size.endswith(f"{ratio:.3g}x") and "KiB" in size
    target = next(line for line in lines if line.startswith("target"))
    assert "cpu-fp32" in target and "cpu-int8" in target and target.endswith("differs")
    # aligned: the value columns start at the same offset on every row of the table
    col_b = lines[0].index("B: int8-art")
    assert target.index("cpu-int8") == col_b and size.index(size.split()[4]) == col_b
    new_op = next(op for op in int8.report["artifact"]["ops"] if op not in fp32.report["artifact"]["ops"])
    op_line = next(line for line in lines if line.startswith(new_op + " "))
    assert op_line.split()[1:] == ["0", str(int8.report["artifact"]["ops"][new_op]),
                                   f"+{int8.report['artifact']['ops'][new_op]}"]


def test_missing_values_print_as_dash(arts):
    fp32, int8 = arts
    b = copy.deepcopy(int8.report)
    b["speed"] = {"source_ms": 2.0, "compiled_ms": 1.0, "speedup": 2.0}
    b["accuracy"] = {"source_perplexity": 10.0, "compiled_perplexity": 10.5, "perplexity_change": 0.05}
    text = format_compare("a", fp32.report, "b", b)
    speed = next(line for line in text.splitlines() if line.startswith("single-token speedup"))
    assert speed.split()[2:] == ["-", "2x", "-"]
    ppl = next(line for line in text.splitlines() if line.startswith("perplexity change"))
    assert "+5.00%" in ppl and ppl.split()[2] == "-"


def test_compare_artifacts_and_identical(arts):
    fp32, int8 = arts
    text, result = compare_artifacts(fp32.path, int8.path)
    assert str(fp32.path)[-20:] in text and rows_by_label(result)["artifact bytes"]["ratio"] < 1
    text, result = compare_artifacts(fp32.path, fp32.path)
    assert result["ops"] == [] and "op histograms: identical" in text
    assert rows_by_label(result)["artifact bytes"]["ratio"] == 1


def test_not_an_artifact(arts, tmp_path):
    with pytest.raises(InputError, match="not an llmopt artifact"):
        compare_artifacts(arts[0].path, tmp_path)
    with pytest.raises(InputError, match="not an llmopt manifest"):
        compare_reports(arts[0].report, {"hello": 1})

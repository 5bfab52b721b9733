"""`llmopt report`: the HTML / Markdown report of a real compiled artifact (and a real bench report)."""

from __future__ import annotations

import copy
import html
import json
import re
from html.parser import HTMLParser

import pytest

from llmopt.ort.bench import BenchSettings, benchmark
from llmopt.compiler.driver import compile
from llmopt.core.pipeline import parse
from llmopt.errors import InputError, OutputError
from llmopt.reporting.html_report import render_html, render_markdown, write_report
from llmopt.reporting.sections_weights import layer_index
from llmopt.reporting.svg import nice_ticks, svg_hbar_chart, svg_line_chart


@pytest.fixture(scope="module")
def arts(exported, tmp_path_factory):
    """An fp32 and an int8 artifact of the tiny llama, and a short bench report of the int8 one."""
    root = tmp_path_factory.mktemp("report")
    src = exported("llama", True)
    fp32 = compile(src, "cpu-fp32", root / "fp32", measure_speed=False)
    int8 = compile(src, "cpu-int8", root / "int8", measure_speed=False)
    bench = benchmark(int8.path, None, BenchSettings(prompt_len=8, new_tokens=6, repeats=1))
    bench_path = root / "bench.json"
    bench_path.write_text(json.dumps(bench, indent=2))
    return {"root": root, "fp32": fp32, "int8": int8, "bench": bench, "bench_path": bench_path}


def section(doc: str, sid: str) -> str:
    start = doc.index(f'<section id="{sid}">')
    return doc[start:doc.index("</section>", start)]


class _Balance(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link", "line", "circle", "rect", "polyline", "path"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def test_html_report_of_a_real_artifact(arts):
    art, bench = arts["int8"], arts["bench"]
    out = arts["root"] / "out"
    written = write_report(art.path, out / "r.html", out / "r.md", arts["bench_path"])
    assert written == [out / "r.html", out / "r.md"]
    assert sorted(p.name for p in out.iterdir()) == ["r.html", "r.md"]  # no temp files left behind
    doc = (out / "r.html").read_text()
    m = art.report

    # self-contained and well formed
    assert doc.startswith("<!DOCTYPE html>") and "<style>" in doc
    assert "<script" not in doc and "src=" not in doc and 'href="http' not in doc
    checker = _Balance()
    checker.feed(doc)
    assert checker.errors == [] and checker.stack == []

    # header and summary
    assert "cpu-int8" in doc and m["source"]["path"] in doc and m["created"] in doc
    assert m["machine"]["cpu"] in doc and m["llmopt_version"] in doc
    summary = section(doc, "summary")
    assert f'{m["artifact"]["size_ratio"]:.3g}x' in summary
    assert f'{m["artifact"]["source_nodes"]}</td>' in summary and f'{m["artifact"]["nodes"]}</td>' in summary
    assert ("PASS" if m["verification"]["passed"] else "FAIL") in summary
    assert f'{m["verification"]["figures"]["cosine"]:.6g}' in summary
    for c in m["constraints"]:
        assert html.escape(c) in section(doc, "warnings")

    # pass timeline: every pass of the pipeline, in order, and a bar chart
    passes = section(doc, "passes")
    assert "<svg" in passes
    names = [spec.name for spec in parse(m["pipeline"]).pass_specs()]
    assert [r["name"] for r in m["passes"]] == names
    positions = [passes.index(f"{i}. {n}") for i, n in enumerate(names, 1)]
    assert positions == sorted(positions)
    fuse = next(r for r in m["passes"] if r["name"] == "fuse")
    assert f"{fuse['nodes_before']} → {fuse['nodes_after']}" in passes
    assert f"gqa={fuse['counters']['gqa']}" in passes

    # op histogram: the real counts, source vs artifact
    ops = section(doc, "ops")
    gqa = m["artifact"]["ops"]["com.microsoft::GroupQueryAttention"]
    assert re.search(rf'>GroupQueryAttention</td><td[^>]*>com\.microsoft</td><td[^>]*>0</td><td[^>]*>{gqa}</td>', ops)
    src_mm, art_mm = m["artifact"]["source_ops"]["MatMul"], m["artifact"]["ops"].get("MatMul", 0)
    assert re.search(rf'>MatMul</td><td[^>]*></td><td[^>]*>{src_mm}</td><td[^>]*>{art_mm}</td>', ops)

    # latency chart from the bench: one point per decode step, at positions from prompt_len on
    lat = section(doc, "latency")
    assert lat.count("<svg") == 1 and "<polyline" in lat
    steps = bench["models"]["artifact"]["batches"]["1"]["steps_ms_last_run"]
    assert lat.count("<circle") == len(steps)
    assert "artifact, batch 1" in lat and "position (tokens in the cache)" in lat
    assert f'{bench["models"]["artifact"]["batches"]["1"]["step_ms_p50"]:.4g}' in lat

    # quantization error: cpu-int8's quantize-dynamic records it per weight: a chart, and the worst tensor first
    quant = section(doc, "quantization")
    assert m["quantization_error"], "cpu-int8 quantizes weights: the manifest must hold their errors"
    assert quant.count("<svg") == 1
    worst = max(m["quantization_error"].items(), key=lambda kv: kv[1]["rel_rmse"])
    assert re.search(rf'<td class="code">{re.escape(html.escape(worst[0]))}</td>', quant)
    assert f'{worst[1]["rel_rmse"]:.4g}' in quant
    # an fp32 artifact quantized nothing: the section says so instead of drawing an empty chart
    fp32_quant = section(render_html(arts["fp32"].report), "quantization")
    assert arts["fp32"].report["quantization_error"] is None
    assert "no quantization_error" in fp32_quant and "<svg" not in fp32_quant


def test_html_without_bench_says_how_to_get_one(arts):
    doc = render_html(arts["fp32"].report)
    lat = section(doc, "latency")
    assert "<svg" not in lat
    assert "llmopt bench ART --json &gt; bench.json" in lat or "llmopt bench ART --json > bench.json" in lat
    assert "llmopt report ART --bench bench.json" in lat
    assert "<svg" in section(doc, "passes")
    assert 'id="sparsity"' not in doc  # no pruning: no sparsity section
    assert "cpu-fp32" in doc


def test_markdown_report(arts):
    m = arts["int8"].report
    md = render_markdown(m, arts["bench"], title="int8 <tiny> | llama")
    assert md.startswith("# int8 \\<tiny\\> \\| llama") or md.startswith("# int8 <tiny> | llama")
    for heading in ("## Overview", "## Summary", "## Warnings", "## Pass timeline", "## Op histogram",
                    "## Latency per token vs position", "## Per-layer quantization error"):
        assert heading in md
    assert "| # | pass | seconds |" in md
    for i, name in enumerate((spec.name for spec in parse(m["pipeline"]).pass_specs()), 1):
        assert re.search(rf"^\| {i} \| `{re.escape(name)}` \|", md, re.M)
    gqa = m["artifact"]["ops"]["com.microsoft::GroupQueryAttention"]
    assert f"| `GroupQueryAttention` | com.microsoft | 0 | {gqa} |" in md
    assert "| artifact, batch 1 | 8–12 |" in md  # 5 decode steps from position 8
    assert "<svg" not in md
    assert "|---" in md and "---:|" in md  # real tables, numbers right-aligned


def test_quantization_error_and_sparsity_sections(arts):
    m = copy.deepcopy(arts["int8"].report)
    m["quantization_error"] = {
        "model.layers.0.mlp.down_proj.weight": {"rel_rmse": 0.01, "pass": "quantize-dynamic"},
        "model.layers.0.self_attn.q_proj.weight": {"rel_rmse": 0.03, "pass": "quantize-dynamic"},
        "model.layers.1.mlp.down_proj.weight": {"rel_rmse": 0.05, "pass": "quantize-dynamic", "bits": 8},
        "model.embed_tokens.weight": {"rel_rmse": 0.002, "pass": "quantize-dynamic"},
    }
    m["sparsity"] = {"model.layers.0.mlp.up_proj.weight": 0.5, "model.layers.1.mlp.up_proj.weight": 0.25}
    m["warnings"] = ["a <script>alert(1)</script> & friends"]
    doc = render_html(m)
    quant = section(doc, "quantization")
    assert quant.count("<svg") == 1
    assert ">layer 0</text>" in quant and ">layer 1</text>" in quant and ">other</text>" in quant
    assert "0.02 (2 weights)" in quant  # mean of layer 0
    worst = re.findall(r'<td class="code">(model\.[^<]+)</td>', quant)
    assert worst[0] == "model.layers.1.mlp.down_proj.weight" and worst[-1] == "model.embed_tokens.weight"
    assert "bits=8" in quant
    sp = section(doc, "sparsity")
    assert "<svg" in sp and "50.0%" in sp and "25.0%" in sp
    assert "<script>" not in doc and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; friends" in doc
    md = render_markdown(m)
    assert "| `model.layers.1.mlp.down_proj.weight` | 1 | `quantize-dynamic` | 0.05 | bits=8 |" in md
    assert "## Sparsity" in md and "layer 0  " in md


def test_sparse_manifest_still_renders():
    """An older or minimal manifest (no ops, no verification, no passes) renders with notes, not errors."""
    m = {"target": {"name": "cpu-fp32"}, "artifact": {"bytes": 10}, "verification": None, "passes": []}
    doc = render_html(m)
    assert "cpu-fp32" in doc and "skipped" in section(doc, "summary") and "no passes" in section(doc, "passes")
    assert "no op histogram" in section(doc, "ops")
    assert "## Pass timeline" in render_markdown(m)
    with pytest.raises(InputError, match="not an llmopt manifest"):
        render_html({"hello": 1})
    with pytest.raises(InputError, match="not an llmopt bench report"):
        render_html(m, {"settings": {}})


def test_quantization_error_without_layer_names(arts):
    """torch.onnx names transposed weights val_NN: one bar per tensor then, in name order, unless the
    record says where the weight sits (``layer``, or a ``scope`` naming it)."""
    m = copy.deepcopy(arts["int8"].report)
    m["quantization_error"] = {f"val_{i}": {"rel_rmse": 0.001 * k, "pass": "weight-only"}
                               for k, i in enumerate([249, 57, 1000], 1)}
    quant = section(render_html(m), "quantization")
    labels = re.findall(r'text-anchor="end">(val_\d+)</text>', quant)
    assert labels == ["val_57", "val_249", "val_1000"]
    assert "no layer index" in quant
    m["quantization_error"]["val_57"]["layer"] = 0
    m["quantization_error"]["val_249"]["scope"] = "model.model.layers.1.mlp.down_proj"
    quant = section(render_html(m), "quantization")
    assert re.findall(r'text-anchor="end">([^<]+)</text>', quant) == ["layer 0", "layer 1", "other"]


def test_layer_index():
    assert layer_index("model.layers.3.mlp.down_proj.weight") == 3
    assert layer_index("model.model.layers.0.self_attn.q_proj") == 0
    assert layer_index("transformer.h.11.attn.c_attn.weight") == 11
    assert layer_index("/model/layers_2/mlp/MatMul_weight") == 2
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None


def test_svg_helpers():
    assert nice_ticks(0, 0.307) == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert nice_ticks(8, 12, 8, integer=True) == [8, 9, 10, 11, 12]
    bars = svg_hbar_chart(["a", "b <&>"], [1.0, 2.5], unit="s")
    assert bars.startswith("<svg") and bars.count("<rect") == 2 and "b &lt;&amp;&gt;" in bars
    lines = svg_line_chart([("x", [1, 2, 3], [1.0, 2.0, 1.5]), ("y", [1, 2], [0.5, 0.7])], xlabel="pos", ylabel="ms")
    assert lines.count("<polyline") == 2 and lines.count("<circle") == 5 and ">pos</text>" in lines


def test_bad_inputs(arts, tmp_path):
    out = tmp_path / "r.html"
    with pytest.raises(InputError, match="not an llmopt artifact"):
        write_report(tmp_path, out, None, None)
    not_json = tmp_path / "bench.json"
    not_json.write_text("prefill 1234 tok/s\n")
    with pytest.raises(InputError, match="not JSON"):
        write_report(arts["int8"].path, out, None, not_json)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(InputError, match="not an llmopt bench report"):
        write_report(arts["int8"].path, out, None, other)
    with pytest.raises(InputError, match="no such bench report"):
        write_report(arts["int8"].path, out, None, tmp_path / "missing.json")
    with pytest.raises(InputError, match="--html"):
        write_report(arts["int8"].path, None, None, None)
    with pytest.raises(OutputError, match="is a directory"):
        write_report(arts["int8"].path, tmp_path, None, None)
    assert not out.exists()
    with pytest.raises(InputError) as info:
        write_report(arts["int8"].path, out, None, not_json)
    assert "\n" not in str(info.value)  # one-line messages


def test_rewrites_an_existing_report(arts, tmp_path):
    out = tmp_path / "r.md"
    out.write_text("old")
    assert write_report(arts["fp32"].path, None, out, None) == [out]
    assert out.read_text().startswith("# llmopt report: ") and "cpu-fp32" in out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]

"""End to end: compile for cpu-int8 / cpu-fp32, artifact layout, manifest, verification."""

import json

import numpy as np
import pytest

import llmopt
from llmopt.core import model_io
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.errors import VerificationError
from llmopt.models.architectures import ARCHITECTURES


def _hash(path):
    return model_io.sha256_files(model_io.model_files(path))


@pytest.mark.parametrize("with_past", [False, True], ids=["no-past", "past"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cpu_int8_every_architecture(exported, tmp_path, arch, with_past):
    src = exported(arch, with_past)
    before = _hash(src)
    art = llmopt.compile(src, target="cpu-int8", out=tmp_path / "art", measure_speed=False)
    assert _hash(src) == before  # the input is never modified
    cached = with_past or arch != "gpt2"  # kv-cache gives every cache-less export one, except GPT-2's (MHA)
    files = ["llmopt.json", "model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in art.path.iterdir()) == sorted(files + ["genai_config.json"] * cached)
    r = json.loads((art.path / "llmopt.json").read_text())
    assert r == json.loads(json.dumps(art.report))
    assert r["target"]["name"] == "cpu-int8" and r["provider"] == "CPUExecutionProvider"
    assert r["source"]["sha256"] == before
    assert r["verification"]["passed"] and r["verification"]["figures"]["cosine"] > 0.999
    assert [p["name"] for p in r["passes"]] == ["fold", "cleanup", "fuse", "kv-cache", "logits-to-keep", "quantize-moe", "quantize-dynamic", "cleanup"]
    assert r["passes"][2]["nodes_after"] < r["passes"][2]["nodes_before"]
    q = r["passes"][6]
    assert q["counters"]["matmul"] >= 1 and q["bytes_after"] < q["bytes_before"]
    assert r["io"]["inputs"][0]["name"] == "input_ids"
    assert (r["kv_cache"] is not None) == cached
    assert ("no KV cache" in " ".join(r["warnings"])) == (not cached)
    has_gqa = any(n.op_type == "GroupQueryAttention" for n in llmopt.load(art.model_path).graph)
    assert bool(r["constraints"]) == has_gqa
    # the artifact runs by itself in ORT and agrees with the source
    model = llmopt.load(src)
    feeds = verify.sample_inputs(model, verify.default_shapes(with_past)[0], seed=7)
    want = sessions.run(sessions.make_session(src), feeds)
    got_feeds = dict(feeds)
    if cached and not with_past:  # the cache was added: an empty one gives the prefill
        for v in llmopt.load(art.model_path).graph.inputs:
            if v.name.startswith("past_key_values."):
                got_feeds[v.name] = np.zeros((feeds["input_ids"].shape[0], v.shape[1], 0, v.shape[3]), np.float32)
    got = sessions.run(sessions.make_session(art.model_path), got_feeds)
    assert set(got) >= set(want)
    assert verify.compare(want, got).cosine > 0.999


def test_cpu_fp32_is_exact(exported, tmp_path):
    from llmopt.frontend.inspector import inspect_model

    src = exported("mistral", True)
    art = llmopt.compile(src, target="cpu-fp32", out=tmp_path / "a", measure_speed=False)
    assert art.report["verification"]["figures"]["max_abs"] < 1e-5
    weights = [inspect_model(p)["parameters"]["by_dtype"]["float"]["bytes"] for p in (src, art.path)]
    assert weights[1] == pytest.approx(weights[0], rel=0.01)  # fp32 stays fp32
    assert art.report["artifact"]["nodes"] < art.report["artifact"]["source_nodes"]


def test_compile_from_hf_dir_with_speed(hf_dirs, tmp_path):
    art = llmopt.compile(hf_dirs("qwen2"), target="cpu-int8", out=tmp_path / "a", speed_pairs=3)
    r = art.report
    assert r["source"]["kind"] == "huggingface" and r["source"]["export"]["with_past"]
    assert r["speed"]["pairs"] == 3 and r["speed"]["source_ms"] > 0 and r["speed"]["compiled_ms"] > 0
    s = r["speed"]
    assert s["speedup_min"] <= s["speedup"] <= s["speedup_max"] and s["speedup"] > 0


def test_passes_and_recipe_replace_pipeline(exported, tmp_path):
    src = exported("llama", True)
    art = llmopt.compile(src, out=tmp_path / "a", passes="cleanup,quantize-dynamic{gather=false}", measure_speed=False)
    assert [p["name"] for p in art.report["passes"]] == ["cleanup", "quantize-dynamic"]
    assert "gather" not in art.report["passes"][1]["counters"]
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nfixpoint = [{ name = "fold" }, { name = "cleanup" }]\n')
    art = llmopt.compile(src, target="cpu-fp32", out=tmp_path / "b", recipe=recipe, measure_speed=False)
    assert art.report["pipeline"] == "fixpoint(fold,cleanup)"
    assert art.report["passes"][-1]["iteration"] >= 2 and not art.report["passes"][-1]["modified"]


def test_missed_budget_writes_nothing_but_the_report(exported, tmp_path):
    out = tmp_path / "a"
    report = tmp_path / "report.json"
    with pytest.raises(VerificationError, match="misses the cpu-int8 accuracy budget: max-abs error") as info:
        llmopt.compile(exported("llama", True), out=out, thresholds={"max_abs": 1e-9}, report_path=report, measure_speed=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.")]  # no staging left behind
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] is False and data["verification"]["misses"]
    assert json.loads(json.dumps(info.value.report)) == data


def test_recompile_replaces_previous_artifact(exported, tmp_path):
    src = exported("llama", True)
    out = tmp_path / "a"
    llmopt.compile(src, target="cpu-fp32", out=out, measure_speed=False)
    art = llmopt.compile(src, target="cpu-int8", out=out, measure_speed=False)
    assert llmopt.Artifact.open(out).report["target"]["name"] == "cpu-int8" == art.report["target"]["name"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_input_ids_only_export_compiles_with_defaults(exported_ids_only, tmp_path, arch):
    """torch.onnx's plainest export (input_ids → logits, made outside llmopt) compiles to cpu-int8 with the
    target's defaults: attention fused, lengths from input_ids' shape per row (verification's batch-2
    sample used to fail on a [1, S] range), then a cache and an attention_mask added by kv-cache."""
    src = exported_ids_only(arch)
    art = llmopt.compile(src, target="cpu-int8", out=tmp_path / "art")
    r = art.report
    assert r["verification"]["passed"] and r["verification"]["samples"][0]["batch"] == 2
    fuse = next(p for p in r["passes"] if p["name"] == "fuse")
    assert fuse["counters"]["gqa"] == 2 and fuse["counters"]["gqa_seqlens_from_mask"] == 2
    kv = next(p for p in r["passes"] if p["name"] == "kv-cache")
    assert kv["counters"]["attention_mask_added"] == 1 and kv["counters"]["layers_given_cache"] == 2
    inputs = [v["name"] for v in r["io"]["inputs"]]
    assert inputs[:2] == ["input_ids", "attention_mask"] and "past_key_values.1.value" in inputs
    assert r["speed"]["speedup"] > 0
    # without kv-cache: the lengths come from input_ids' shape, right at batch 2, numerically exact
    plain = llmopt.compile(src, target="cpu-fp32", out=tmp_path / "plain", passes="fold,cleanup,fuse,cleanup",
                           measure_speed=False)
    assert plain.report["verification"]["figures"]["max_abs"] < 1e-4
    assert "gqa_seqlens_k_from_shape" in {n.name for n in llmopt.load(plain.model_path).graph}
    # and the cached artifact generates what full recomputation of the source generates
    from llmopt.ort.generation import Generator, greedy_by_recompute

    prompt = [5, 9, 14, 3]
    fp32 = llmopt.compile(src, target="cpu-fp32", out=tmp_path / "fp32", measure_speed=False)
    assert Generator(fp32.path).generate([prompt], 12).tokens[0] == greedy_by_recompute(src, prompt, 12)

"""kv-cache and the generation runtime: incremental decoding through the rewritten cached graph
gives the same greedy tokens as full recomputation with the source graph, for every architecture."""

import json

import numpy as np
import pytest

import llmopt
from llmopt.core import model_io, graph_util
from llmopt.core.manager import run_pipeline
from llmopt.models.architectures import ARCHITECTURES
from llmopt.passes.kv_cache import KVCacheError
from llmopt.ort.generation import Generator, Sampling, greedy_by_recompute

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [21, 22, 23]]  # different lengths: batch 2, right padding
NEW = 12


def _compile(src, pipeline, out):
    model = llmopt.load(src)
    result = run_pipeline(model, pipeline)
    model_io.save(model, out)
    return result


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "gpt2"])
def test_cache_added_to_no_cache_export_matches_recompute(exported, tmp_path, arch):
    src = exported(arch, False)
    buffer = "shared" if arch != "llama" else "concat"
    res = _compile(src, f"fold,cleanup,fuse,cleanup,kv-cache{{max_length=64,buffer={buffer}}},cleanup", tmp_path / "m.onnx")
    kv = next(r for r in res.records if r.name == "kv-cache")
    assert kv.counters["layers_given_cache"] == 2 and kv.counters["cos_sin_tables"] >= 1
    gen = Generator(tmp_path / "m.onnx")
    assert gen.layout.buffer == buffer and gen.layout.layers == 2
    got = gen.generate(PROMPTS, NEW).tokens
    want = [greedy_by_recompute(src, p, NEW) for p in PROMPTS]
    assert got == want


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exported_cache_canonicalized_and_fused_matches_recompute(exported, tmp_path, arch):
    _compile(exported(arch, True), "fold,cleanup,fuse,kv-cache,cleanup", tmp_path / "m.onnx")
    got = Generator(tmp_path / "m.onnx").generate(PROMPTS, NEW).tokens
    assert got == [greedy_by_recompute(exported(arch, False), p, NEW) for p in PROMPTS]


def test_other_cache_names_are_canonicalized(exported, tmp_path):
    model = llmopt.load(exported("llama", True))
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values."):
            _, layer, kind = v.name.split(".")
            v.name = f"past_{kind}.{layer}"
    for v in model.graph.outputs:
        if v.name.startswith("present."):
            _, layer, kind = v.name.split(".")
            v.name = f"present_{kind}.{layer}"
    p = llmopt.core.registry.get_pass("kv-cache")()
    assert p(model).modified
    assert p.counters["renamed_inputs"] == 4 and p.counters["renamed_outputs"] == 4
    assert {v.name for v in model.graph.inputs} >= {"past_key_values.0.key", "past_key_values.1.value"}
    assert json.loads(model.metadata_props["llmopt.kv_cache"])["kv_heads"] == 2


def test_refusals_are_clear(exported):
    with pytest.raises(KVCacheError, match="put 'fuse' before 'kv-cache'"):
        run_pipeline(llmopt.load(exported("llama", False)), "kv-cache{require=true}")
    with pytest.raises(KVCacheError, match="not fused to GroupQueryAttention"):  # GPT-2 fuses to MultiHeadAttention
        run_pipeline(llmopt.load(exported("gpt2", False)), "fold,cleanup,fuse,kv-cache{require=true}")
    # in a target's pipeline (require=false) the graph is left without a cache, and the report says so
    result = run_pipeline(llmopt.load(exported("gpt2", False)), "fold,cleanup,fuse,kv-cache")
    assert result.records[-1].counters == {"left_without_cache": 1}
    assert any("kv-cache:" in w and "no KV cache" in w for w in result.warnings)
    with pytest.raises(KVCacheError, match="buffer=shared"):
        run_pipeline(llmopt.load(exported("gpt2", True)), "fold,cleanup,fuse,kv-cache{buffer=shared}")


def test_compile_verifies_incremental_decoding_against_recompute(exported, tmp_path):
    art = llmopt.compile(exported("qwen2", False), target="cpu-fp32", out=tmp_path / "art", measure_speed=True,
                         speed_pairs=3, passes="fold,cleanup,fuse,cleanup,kv-cache{max_length=128},cleanup")
    ver = art.report["verification"]
    assert ver["passed"] and ver["samples"][0]["reference"] == "full recomputation"
    assert ver["figures"]["max_abs"] < 1e-4
    assert "recomputes" in art.report["speed"]["what"]
    assert art.report["kv_cache"]["layers"] == 2


def test_generation_stops_at_eos(exported, tmp_path):
    _compile(exported("llama", True), "fold,cleanup,fuse,kv-cache,cleanup", tmp_path / "m.onnx")
    gen = Generator(tmp_path / "m.onnx")
    free = gen.generate(PROMPTS, 6).tokens
    j = next((i for i, t in enumerate(free[0]) if i and t not in free[0][:i]), 0)  # a token first seen at j
    stopped = gen.generate(PROMPTS, 6, eos_token_id=free[0][j]).tokens
    assert stopped[0] == free[0][: j + 1]  # up to and including EOS
    assert stopped[1] == free[1][: len(stopped[1])]  # the other row runs until it stops or the batch ends


def test_sampling():
    from llmopt.ort.generation import _choose

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50))
    assert (_choose(logits, Sampling(greedy=False, top_k=1), rng) == logits.argmax(-1)).all()
    assert (_choose(logits, Sampling(greedy=False, top_p=1e-9), rng) == logits.argmax(-1)).all()
    a = _choose(logits, Sampling(greedy=False, temperature=0.7), np.random.default_rng(1))
    b = _choose(logits, Sampling(greedy=False, temperature=0.7), np.random.default_rng(1))
    assert (a == b).all()
    with pytest.raises(llmopt.LlmoptError, match="temperature"):
        Sampling(greedy=False, temperature=0)


def test_a_cache_that_cannot_be_added_leaves_the_graph_as_it_was(exported_ids_only, monkeypatch):
    """Adding a cache is all or nothing: here it fails after the attention_mask input was added
    (the head size cannot be read); the graph goes back to what it was, the pass says it changed
    nothing and warns."""
    from llmopt.core.registry import get_pass

    model = llmopt.load(exported_ids_only("llama"))
    run_pipeline(model, "fold,cleanup,fuse")
    before = (graph_util.io_signature(model), graph_util.op_histogram(model), graph_util.node_count(model))
    monkeypatch.setattr(graph_util, "gqa_head_dim", lambda node: None)
    p = get_pass("kv-cache")()
    assert not p(model).modified
    assert dict(p.counters) == {"left_without_cache": 1} and "query is unknown" in p.warnings[0]
    assert (graph_util.io_signature(model), graph_util.op_histogram(model), graph_util.node_count(model)) == before
    assert "attention_mask" not in [v.name for v in model.graph.inputs]

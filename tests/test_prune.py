"""prune: requested sparsity per tensor, exact N:M groups, genuinely smaller FFNs, zeros that
survive quantization, and clear refusals."""

import json

import numpy as np
import pytest

import llmopt
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.errors import LlmoptError, PipelineError
from llmopt.passes.prune import SPARSITY_KEY, PruneError

from test_cli import assert_clean_error, llmopt_cli


def _fused(exported, arch="llama"):
    model = llmopt.load(exported(arch, True))
    llmopt.run_pipeline(model, "fold,cleanup,fuse,cleanup")
    return model


def _pruned_weights(model):
    return {v.name: v.const_value.numpy() for v in model.graph.initializers.values() if v.name.endswith("_pruned")}


@pytest.mark.parametrize("options", ["{sparsity=0.3}", "{sparsity=0.5,method=wanda,calibration=random,samples=2,seq_len=16}",
                                     "{sparsity=0.5,scope=global}"])
def test_unstructured_sparsity(exported, options):
    model = _fused(exported)
    feeds = [verify.sample_inputs(model, verify.default_shapes(True)[0], 0)]
    result = llmopt.run_pipeline(model, f"prune{options}")
    weights = _pruned_weights(model)
    assert weights and result.records[0].counters["tensors"] == len(weights)
    target = 0.3 if "0.3" in options else 0.5
    zeros = {name: float((w == 0).mean()) for name, w in weights.items()}
    if "global" in options:
        total = sum((w == 0).sum() for w in weights.values()) / sum(w.size for w in weights.values())
        assert abs(total - target) < 1e-3
    else:
        for name, w in weights.items():
            assert abs(zeros[name] - target) <= 1 / w.shape[0] + 1e-9, name
    if "wanda" in options:  # per output column
        for w in weights.values():
            assert len(set((w == 0).sum(axis=0).tolist())) == 1
    recorded = json.loads(model.metadata_props[SPARSITY_KEY])
    assert recorded == pytest.approx(zeros, abs=1e-6)
    out = sessions.run_ir_model(model, feeds)[0]
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_n_m_groups_hold_exactly_n(exported, pattern, method):
    model = _fused(exported)
    llmopt.run_pipeline(model, f"prune{{pattern={pattern},method={method},calibration=random,samples=2,seq_len=16}}")
    n, m = map(int, pattern.split(":"))
    for name, w in _pruned_weights(model).items():
        groups = (w != 0).T.reshape(w.shape[1], -1, m).sum(axis=-1)
        assert (groups == n).all(), name


def test_ffn_channels_make_the_model_smaller(exported, tmp_path):
    src = exported("llama", True)
    dense = llmopt.compile(src, target="cpu-fp32", out=tmp_path / "dense", measure_speed=False)
    pruned = llmopt.compile(src, target="cpu-fp32", out=tmp_path / "pruned", measure_speed=False, verify_model=False,
                            passes="fold,cleanup,fuse,prune-ffn{ratio=0.25},kv-cache,cleanup")
    rec = next(p for p in pruned.report["passes"] if p["name"] == "prune-ffn")
    assert rec["counters"]["mlps"] == 2 and rec["counters"]["channels_removed"] == 2 * 32  # 25% of 128
    assert rec["bytes_after"] < rec["bytes_before"]
    assert pruned.report["artifact"]["bytes"] < dense.report["artifact"]["bytes"]
    model = llmopt.load(pruned.model_path)
    feeds = verify.sample_inputs(model, verify.default_shapes(True)[1], 3)
    out = sessions.run(sessions.make_session(pruned.model_path), feeds)
    assert out["logits"].shape[-1] == 512 and np.isfinite(out["logits"]).all()


def test_zeros_survive_quantization(exported):
    model = _fused(exported)
    llmopt.run_pipeline(model, "prune{sparsity=0.5},qdq{calibration=random,samples=2,seq_len=16}")
    q = [v.const_value.numpy() for v in model.graph.initializers.values() if v.name.endswith("_pruned_int8")]
    assert q and all(abs((w == 0).mean() - 0.5) < 0.05 for w in q)


def test_bad_requests_refuse(exported, tmp_path):
    with pytest.raises(PipelineError, match="sparsity"):
        llmopt.run_pipeline(_fused(exported), "prune{sparsity=1.0}")
    with pytest.raises(PruneError, match="does not divide"):
        llmopt.run_pipeline(_fused(exported), "prune{pattern=3:7}")
    with pytest.raises(LlmoptError, match="no gated MLP"):
        llmopt.run_pipeline(_fused(exported, "gpt2"), "prune-ffn")
    with pytest.raises(LlmoptError, match="no GroupQueryAttention"):  # GPT-2's heads sit in MultiHeadAttention
        llmopt.run_pipeline(_fused(exported, "gpt2"), "prune-heads")
    res = llmopt_cli("compile", exported("llama", True), "-o", tmp_path / "x", "--no-speed",
                     "--passes", "fold,cleanup,fuse,prune{sparsity=-0.1}")
    assert_clean_error(res, 2, "sparsity")
    res = llmopt_cli("compile", exported("gpt2", True), "-o", tmp_path / "y", "--no-speed",
                     "--passes", "fold,cleanup,fuse,prune-ffn")
    assert_clean_error(res, 2, "no gated MLP")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_artifact_and_inspect_report_sparsity(exported, tmp_path):
    art = llmopt.compile(exported("llama", True), target="cpu-fp32", out=tmp_path / "a", measure_speed=False,
                         verify_model=False, passes="fold,cleanup,fuse,prune{pattern=2:4},kv-cache,cleanup")
    assert art.report["sparsity"] and all(v == 0.5 for v in art.report["sparsity"].values())
    res = llmopt_cli("inspect", art.path, "--sparsity", "--json")
    info = json.loads(res.stdout)
    assert {k: v for k, v in info["sparsity"].items() if k in art.report["sparsity"]} == art.report["sparsity"]
    assert "sparsity:" in llmopt_cli("inspect", art.path, "--sparsity").stdout


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: a biased QKV projection
def test_heads_pruning_shrinks_attention_and_the_cache(exported, tmp_path, arch):
    art = llmopt.compile(exported(arch, True), target="cpu-fp32", out=tmp_path / "a", measure_speed=False,
                         verify_model=False, passes="fold,cleanup,fuse,prune-heads{ratio=0.5},kv-cache,cleanup")
    rec = next(p for p in art.report["passes"] if p["name"] == "prune-heads")
    assert rec["counters"]["kv_heads_removed"] == 2 and rec["counters"]["query_heads_removed"] == 4  # 1 of 2 per layer
    assert art.report["kv_cache"]["kv_heads"] == 1
    gqa = [n for n in llmopt.load(art.model_path).graph if n.op_type == "GroupQueryAttention"]
    assert all(n.attributes["num_heads"].as_int() == 2 and n.attributes["kv_num_heads"].as_int() == 1 for n in gqa)
    from llmopt.ort.generation import Generator

    tokens = Generator(art.path).generate([[5, 6, 7, 8]], 5).tokens[0]  # decodes with the smaller cache
    assert len(tokens) == 5


def test_per_layer_overrides(exported):
    model = _fused(exported)
    first = next(n.inputs[1].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
                 and n.inputs[1].const_value.size >= 4096)
    result = llmopt.run_pipeline(model, f"prune{{sparsity=0.5,overrides={first}:0.2}}")
    assert result.records[0].counters["overridden"] == 1
    sparsity = json.loads(model.metadata_props[SPARSITY_KEY])
    assert sparsity.pop(f"{first}_pruned") == pytest.approx(0.2, abs=1e-3)
    assert all(v == pytest.approx(0.5, abs=1e-3) for v in sparsity.values())
    with pytest.raises(PipelineError, match="PATTERN:SPARSITY"):
        llmopt.run_pipeline(_fused(exported), "prune{overrides=nonsense}")


def test_global_threshold_streams_and_matches_the_exact_quantile():
    """``scope=global`` finds its threshold one tensor at a time (a narrowing histogram), and gets the
    very value ``np.partition`` over every score at once would: ties, zeros and constant tensors too."""
    from llmopt.passes.prune import kth_smallest

    rng = np.random.default_rng(0)
    for _ in range(150):
        arrays = []
        for _ in range(int(rng.integers(1, 5))):
            a = np.abs(rng.standard_normal(int(rng.integers(1, 3000)))).astype(np.float32)
            kind = rng.integers(0, 4)
            a = a if kind == 0 else np.where(np.arange(a.size) < a.size // 2, 0, a) if kind == 1 else \
                np.round(a, 1) if kind == 2 else np.full(a.size, 0.5, np.float32)
            arrays.append(a)
        every = np.concatenate(arrays).astype(np.float64)
        k = int(rng.integers(0, every.size))
        # tiny bins and limit: many narrowing passes over the arrays
        assert kth_smallest(lambda: iter(arrays), k, bins=4, limit=7) == np.partition(every, k)[k]


def test_structured_pruning_honours_exclude(exported):
    from llmopt.passes.prune_ffn import _gated_mlps
    from llmopt.core.registry import get_pass

    model = _fused(exported)
    feeds = [verify.sample_inputs(model, verify.default_shapes(True)[1], 3)]
    first = _gated_mlps(model)[0]
    width = first["gate"].inputs[1].const_value.shape[1]
    p = get_pass("prune-ffn")(ratio=0.25, exclude=(first["gate"].name,))
    assert p(model).modified
    assert dict(p.counters) == {"excluded": 1, "mlps": 1, "channels_removed": width // 4}
    assert first["gate"].inputs[1].const_value.shape[1] == width  # the excluded MLP keeps every channel
    out = sessions.run_ir_model(model, feeds)[0]["logits"]
    assert out.shape[-1] == 512 and np.isfinite(out).all()
    # heads: one head count for every layer (one KV-cache layout), so a partial exclude is refused
    model = _fused(exported)
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    with pytest.raises(PruneError, match="exclude matches 1 of 2 attention layers"):
        get_pass("prune-heads")(ratio=0.5, exclude=(gqa.name,))(model)
    assert not get_pass("prune-heads")(ratio=0.5, exclude=("*",))(model).modified

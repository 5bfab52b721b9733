"""fuse: every architecture's export, with and without KV cache, is fully fused (counters equal
the layer counts) and keeps its numerics (fp32, 1e-4 max-abs); unmatched patterns fail safe."""

import numpy as np
import pytest

import llmopt
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.models.architectures import ARCHITECTURES
from llmopt.passes.fuse import FUSION_DOMAIN
from llmopt.passes.fuse_shapes import canonical_dim
from llmopt.core.registry import get_pass

LAYERS = 2  # the tiny configs
NORMS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization", "SkipLayerNormalization"}
ATTENTION = {"GroupQueryAttention", "MultiHeadAttention"}


def _run_fuse(path, **options):
    model = llmopt.load(path)
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(True if "past" in path.name else False))]
    before = sessions.run_ir_model(model, feeds)
    nodes = len(list(model.graph))
    p = get_pass("fuse")(**options)
    result = p(model)
    after = sessions.run_ir_model(model, feeds)
    return model, p, result, nodes, before, after


def _assert_close(before, after, atol=1e-4):
    for b, a in zip(before, after):
        for name in b:
            np.testing.assert_allclose(a[name], b[name], atol=atol, err_msg=name)


@pytest.mark.parametrize("with_past", [False, True], ids=["no-past", "past"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fuse_every_layer(exported, arch, with_past):
    model, p, result, nodes, before, after = _run_fuse(exported(arch, with_past))
    assert result.modified
    ops = [n.op_type for n in model.graph]
    assert sum(ops.count(o) for o in ATTENTION) == LAYERS
    assert sum(ops.count(o) for o in NORMS) == 2 * LAYERS + 1  # two per layer + the final norm
    assert not any(n.domain == FUSION_DOMAIN for n in model.graph)
    if arch == "gpt2":  # learned positions: no rotary; MultiHeadAttention with the cache
        assert p.counters["mha1" if with_past else "mha2"] == LAYERS
        assert ops.count("FastGelu") == LAYERS
    else:  # rotary folded into GroupQueryAttention (do_rotary=1), Q/K/V packed into one MatMul
        gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
        assert p.counters["gqa"] == LAYERS and all(n.attributes["do_rotary"].as_int() == 1 for n in gqa)
        assert all(n.inputs[1] is None and n.inputs[2] is None for n in gqa)  # packed QKV
        assert p.counters["gqa_seqlens_from_mask"] == LAYERS
        assert p.counters["rotary_embedding"] + p.counters.get("partial_rotary_embedding", 0) == 2 * LAYERS
    _assert_close(before, after)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_density_at_most_15_nodes_per_layer(exported, hf_dirs, tmp_path, arch):
    """Nodes per decoder layer after fold,cleanup,fuse,cleanup: (nodes at 3 layers - at 2 layers)."""
    from llmopt.frontend.exporter import export
    from llmopt.core.manager import run_pipeline
    from llmopt.models.architectures import build

    deeper = export(build(arch, tmp_path / "hf", layers=LAYERS + 1), tmp_path / "m.onnx", with_past=True)
    counts = []
    for path in (exported(arch, True), deeper):
        model = llmopt.load(path)
        run_pipeline(model, "fold,cleanup,fuse,cleanup")
        counts.append(len(list(model.graph)))
    assert counts[1] - counts[0] <= 15, counts


def test_gemm_rewritten_for_gpt2(exported):
    model = llmopt.load(exported("gpt2", False))
    p = get_pass("fuse")()
    p(model)
    assert p.counters["gemm_to_matmul"] == 2 * 4
    assert not any(n.op_type == "Gemm" for n in model.graph)


def test_unmatched_attention_fails_safe_and_explains(exported):
    """GPT-2 has no rotary, so GroupQueryAttention cannot match: with attention=gqa the pass
    rolls the attention stages back, the model still runs the same, and explain says why."""
    path = exported("gpt2", True)
    model = llmopt.load(path)
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(True))]
    before = sessions.run_ir_model(model, feeds)
    p = get_pass("fuse")(attention="gqa")
    p.explain = True
    p(model)
    assert p.counters["attention_left_unfused"] == LAYERS
    assert not any(n.op_type in ATTENTION or n.domain == FUSION_DOMAIN for n in model.graph)
    assert sum(n.op_type in NORMS for n in model.graph) == 2 * LAYERS + 1  # the other groups still fused
    gqa = [e for e in p.explanations if e["rule"] == "GQA"]
    assert gqa and "RotaryEmbedding" in gqa[0]["reason"]
    assert any(e["status"] == "rolled back" for e in p.explanations)
    _assert_close(before, sessions.run_ir_model(model, feeds))


def test_groups_can_be_switched_off(exported):
    model, p, _, _, before, after = _run_fuse(exported("llama", True), attention="none", norm=False)
    ops = {n.op_type for n in model.graph}
    assert not ops & (ATTENTION | NORMS)
    assert "RotaryEmbedding" in ops  # rotary stays on
    assert not p.explanations  # explaining costs matching time: only on request
    _assert_close(before, after)


def test_silu_as_quickgelu_keeps_logits(exported):
    model, p, _, _, before, after = _run_fuse(exported("llama", False), silu=True)
    assert p.counters["silu"] == LAYERS and sum(n.op_type == "QuickGelu" for n in model.graph) == LAYERS
    _assert_close(before, after)


def test_bad_attention_mode_is_a_pipeline_error():
    from llmopt.errors import PipelineError
    from llmopt.core.pipeline import parse

    with pytest.raises(PipelineError, match="attention='flash'"):
        parse("fuse{attention=flash}").validate()


@pytest.mark.parametrize("name, canonical", [
    ("sequence_length + past_sequence_length", "past_sequence_length + sequence_length"),
    ("past_sequence_length + sequence_length", "past_sequence_length + sequence_length"),
    ("batch", "batch"),
    ("past + seq - Max(0, past - 4095)", "past + seq - Max(0, past - 4095)"),  # not a plain sum: untouched
])
def test_canonical_dim(name, canonical):
    assert canonical_dim(name) == canonical

"""fuse never keeps a wrong graph: every group of rewrites is checked numerically (ONNX Runtime,
batch 2, with and without past) against the graph before it and rolled back when it disagrees.

Inputs llmopt did not make: an attention variant no rule knows (edited into an export), Granite's
scalar multipliers, and a deliberately wrong rewrite injected into the pass."""

import json

import numpy as np
import onnx_ir as ir

import llmopt
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.passes import fuse as fuse_mod
from llmopt.core.registry import get_pass
from tests.test_cli import llmopt_cli as run_cli

LAYERS = 2
ATTENTION = {"GroupQueryAttention", "MultiHeadAttention"}


def _outputs(model, has_past=True):
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(has_past))]
    return sessions.run_ir_model(model, feeds)


def _assert_close(before, after, rel=1e-4):
    for b, a in zip(before, after):
        for name in b:
            scale = max(1.0, float(np.abs(b[name]).max()))
            np.testing.assert_allclose(a[name], b[name], atol=rel * scale, err_msg=name)


def _per_head_temperature(src, dst):
    """An attention variant no fusion rule knows: the scores of each head multiplied by a learned
    per-head temperature ([1, H, 1, 1]) just before the softmax. Written as a new file."""
    model = ir.load(src)
    softmaxes = [n for n in model.graph if n.op_type == "Softmax"]
    assert len(softmaxes) == LAYERS
    for i, node in enumerate(softmaxes):
        temps = ir.Value(name=f"head_temperature_{i}", shape=ir.Shape([1, 4, 1, 1]),
                         type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(np.array([0.5, 1.0, 1.5, 2.0], dtype=np.float32).reshape(1, 4, 1, 1),
                                               name=f"head_temperature_{i}"))
        model.graph.register_initializer(temps)
        mul = ir.node("Mul", [node.inputs[0], temps], name=f"head_temperature_mul_{i}")
        model.graph.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])
    ir.save(model, dst, external_data=dst.name + ".data")
    return dst


def test_custom_attention_variant_compiles_unfused_verified_and_explained(exported, tmp_path):
    src = _per_head_temperature(exported("llama", True), tmp_path / "custom.onnx")
    art, report = tmp_path / "art", tmp_path / "r.json"
    r = run_cli("compile", src, "--target", "cpu-fp32", "-o", art, "--explain", "fuse", "--report", report)
    assert r.returncode == 0, r.stderr
    compiled = llmopt.load(art / "model.onnx")
    ops = [n.op_type for n in compiled.graph]
    assert not ATTENTION & set(ops)  # attention left as exported ...
    assert ops.count("SkipSimplifiedLayerNormalization") >= LAYERS  # ... the rest still fused
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] and data["verification"]["figures"]["max_abs"] < 1e-4
    fuse = next(p for p in data["passes"] if p["name"] == "fuse")
    sdpa = [e for e in fuse["explanations"] if e.get("stage") == "sdpa"]
    # the failed check: the score Mul before the softmax taken for a scale, whose input is no MatMul
    assert sdpa and sdpa[0]["status"] == "no match" and "found Add" in sdpa[0]["reason"], sdpa
    assert "fuse/sdpa: SDPA did not fire" in r.stdout  # --explain prints it


def test_granite_multipliers_fuse_with_their_scale(hf_dirs, tmp_path):
    """Granite scales attention by ``attention_multiplier`` (not 1/sqrt(head_dim)): onnxscript's GQA
    rule dropped it (a wrong graph); the fused kernel now carries it and the numbers agree."""
    from llmopt.frontend.exporter import export

    path = export(hf_dirs("granite"), tmp_path / "granite.onnx", with_past=True)
    model = llmopt.load(path)
    before = _outputs(model)
    p = get_pass("fuse")()
    p(model)
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == LAYERS and p.counters.get("rolled_back", 0) == 0, p.warnings
    assert all(abs(n.attributes["scale"].as_float() - 0.0078125) < 1e-7 for n in gqa)
    _assert_close(before, _outputs(model))


def _corrupt_first_norm(model):
    """A wrong rewrite: the first fused norm's epsilon set to 1.0 (runs fine, computes other numbers)."""
    for node in model.graph:
        if node.op_type == "SkipSimplifiedLayerNormalization":
            node.attributes["epsilon"] = ir.AttrFloat32("epsilon", 1.0)
            return 1
    return 0


def test_a_wrong_rewrite_is_rolled_back_named_and_the_rest_kept(exported, monkeypatch):
    stages = list(fuse_mod.STAGES)
    at = next(i for i, s in enumerate(stages) if s.name == "skip_rms_normalization")
    stages.insert(at + 1, fuse_mod.Stage("bad_norm", func=_corrupt_first_norm))
    monkeypatch.setattr(fuse_mod, "STAGES", tuple(stages))
    model = llmopt.load(exported("llama", True))
    before = _outputs(model)
    p = get_pass("fuse")()
    p.explain = True
    p(model)
    assert p.counters["rolled_back"] == 1 and "bad_norm" not in p.counters
    assert len(p.warnings) == 1 and "rolled back bad_norm" in p.warnings[0]
    assert "layer 0" in p.warnings[0] and "SkipSimplifiedLayerNormalization" in p.warnings[0]
    assert any(e["status"] == "rolled back" and e["stage"] == "bad_norm" for e in p.explanations)
    ops = [n.op_type for n in model.graph]
    assert ops.count("GroupQueryAttention") == LAYERS and ops.count("SkipSimplifiedLayerNormalization") >= LAYERS
    assert all(n.attributes["epsilon"].as_float() < 1e-3 for n in model.graph
               if n.op_type == "SkipSimplifiedLayerNormalization")
    _assert_close(before, _outputs(model))


def test_a_rewrite_that_breaks_the_graph_is_rolled_back(exported, monkeypatch):
    """A rewrite leaving a graph ONNX Runtime refuses is rolled back like a wrong one."""

    def break_graph(model):
        node = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
        node.attributes["num_heads"] = ir.AttrInt64("num_heads", 3)  # 3 does not divide the hidden size
        return 1

    stages = list(fuse_mod.STAGES)
    at = next(i for i, s in enumerate(stages) if s.name == "gelu")
    stages.insert(at, fuse_mod.Stage("bad_heads", func=break_graph))
    monkeypatch.setattr(fuse_mod, "STAGES", tuple(stages))
    model = llmopt.load(exported("llama", True))
    before = _outputs(model)
    p = get_pass("fuse")()
    p(model)
    assert p.counters["rolled_back"] == 1 and "bad_heads" in p.warnings[0]
    assert all(n.attributes["num_heads"].as_int() == 4 for n in model.graph if n.op_type == "GroupQueryAttention")
    _assert_close(before, _outputs(model))


def test_attention_gqa_cannot_run_falls_back_to_mha(tmp_path):
    """ORT's GroupQueryAttention (CPU) wants a head size that is a multiple of 16: a model with head
    size 8 fuses, the guard finds the fused graph does not run, rolls GQA back and MultiHeadAttention
    takes the attention instead — checked the same way."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmopt.frontend.exporter import export

    cfg = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    model = llmopt.load(export(tmp_path / "hf", tmp_path / "m.onnx", with_past=True))
    before = _outputs(model)
    p = get_pass("fuse")()
    p(model)
    assert p.counters["rolled_back"] == 1 and p.counters["attention_retried_as_mha"] == 1
    assert "head_size shall be a multiple of 16" in p.warnings[0]
    ops = [n.op_type for n in model.graph]
    assert ops.count("MultiHeadAttention") == LAYERS and "GroupQueryAttention" not in ops
    _assert_close(before, _outputs(model))

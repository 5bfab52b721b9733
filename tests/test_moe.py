"""Mixture-of-experts decoders (issue 15): exported with transformers' ``batched_mm`` experts (a
form torch.onnx traces), every expert block fused to ``MoE`` (counter = layer count), the experts
quantized to ``QMoE`` at the int8/int4 targets, verified against the export, and generating what
full recomputation of the export generates.

Default run: fusion of three architectures that spell the block differently (Mixtral: softmax then
top-k, renormalized; gpt-oss: top-k then softmax, transposed experts with biases and a clamped
SwiGLU; Phi-MoE: a sparse-mixer router no MoE mode computes, kept in the graph), a foreign export
(torch.onnx directly, input_ids only), the guard's rollback, QMoE against dequantized weights, and
two architectures compiled at the targets' defaults. All seven architectures at three targets with
``-m slow``."""

import numpy as np
import onnx_ir as ir
import pytest

import llmopt
from llmopt.core.graph_util import add_initializer
from llmopt.core.registry import get_pass
from llmopt.models.architectures import MOE
from llmopt.ort import sessions, verify
from llmopt.ort.generation import Generator, greedy_by_recompute
from llmopt.passes import fuse_moe
from llmopt.quant.spec import QuantSpec
from llmopt.quant.tensor import quantize

PROMPT = [5, 9, 14, 3]
LAYERS = 2
SLOW = pytest.mark.slow


def _fused(path, **options):
    model = llmopt.load(path)
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(verify.has_past_inputs(model)))]
    before = sessions.run_ir_model(model, feeds)
    p = get_pass("fuse")(**options)
    p(model)
    after = sessions.run_ir_model(model, feeds)
    err = max(float(np.abs(a[k] - b[k]).max()) for a, b in zip(after, before) for k in b)
    return model, p, err


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "phimoe"])
def test_every_expert_block_fuses_to_moe(exported, arch):
    model, p, err = _fused(exported(arch))
    moe = [n for n in model.graph if n.op_type == "MoE"]
    assert p.counters["moe"] == LAYERS == len(moe) and not p.warnings
    assert err < 1e-5
    assert not fuse_moe.find_blocks(model.graph) and not any(n.op_type == "TopK" for n in model.graph)  # block gone
    attrs = {k: a.value for k, a in moe[0].attributes.items()}
    assert attrs["k"] == 2 and attrs["activation_type"] == "swiglu" and attrs["swiglu_fusion"] == 1
    if arch == "gpt_oss":  # clamp 7, alpha 1.702, (up + 1): read from the graph's constants
        assert attrs["swiglu_limit"] == pytest.approx(7.0) and attrs["activation_alpha"] == pytest.approx(1.702)
        assert attrs["activation_beta"] == pytest.approx(1.0) and moe[0].inputs[3] is not None  # fc1 bias
    if arch == "phimoe":  # the graph's own routing: log of the dense weights, output scaled back
        assert moe[0].inputs[1].producer().op_type == "Log"


def test_foreign_export_fuses(exported_ids_only):
    """torch.onnx.export of the model itself (input_ids only, no cache): the same blocks fuse."""
    model, p, err = _fused(exported_ids_only("qwen2_moe"))
    assert p.counters["moe"] == LAYERS and err < 1e-5


def test_a_wrong_fusion_is_rolled_back(exported, monkeypatch):
    """Gate/up rows laid out wrongly: the graph no longer computes what it did; the guard undoes it."""
    monkeypatch.setattr(fuse_moe, "_interleave", lambda rows, inter: rows)
    model, p, err = _fused(exported("mixtral"))
    assert p.counters.get("rolled_back") == 1 and "moe" not in p.counters
    assert not any(n.op_type == "MoE" for n in model.graph) and err < 1e-5
    assert any("rolled back moe" in w for w in p.warnings)


def _single_moe(rng, experts=4, hidden=64, inter=32):
    graph = ir.Graph(inputs=[x := ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, hidden])),
                             r := ir.Value(name="r", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, experts]))],
                     outputs=[], nodes=[], opset_imports={"": 17, "com.microsoft": 1})
    fc1 = (rng.standard_normal((experts, 2 * inter, hidden)) * 0.1).astype(np.float32)
    fc2 = (rng.standard_normal((experts, hidden, inter)) * 0.1).astype(np.float32)
    node = ir.node("MoE", [x, r, add_initializer(graph, "fc1", fc1), None, add_initializer(graph, "fc2", fc2)],
                   attributes={"k": 2, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1},
                   domain="com.microsoft")
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    return ir.Model(graph, ir_version=10), fc1, fc2


def _dequantized(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Each expert [N, K] through quantize() and back."""
    out = np.empty_like(w)
    for e in range(w.shape[0]):
        qt = quantize(w[e].T, spec)
        deq = (qt.q - qt.zero[..., None]) * qt.scale[..., None]  # [N, blocks, block]
        out[e] = deq.reshape(w.shape[1], -1)[:, : w.shape[2]]
    return out


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-points"])
def test_qmoe_computes_the_moe_of_its_dequantized_experts(symmetric):
    """QMoE (4-bit, fp32 compute) == MoE over the dequantized weights: packing, scales, zero points."""
    rng = np.random.default_rng(0)
    model, fc1, fc2 = _single_moe(rng)
    feeds = [{"x": rng.standard_normal((9, 64)).astype(np.float32), "r": rng.standard_normal((9, 4)).astype(np.float32)}]
    p = get_pass("quantize-moe")(bits=4, block_size=32, symmetric=symmetric, accuracy_level=0)
    assert p(model).modified and p.counters["moe"] == 1
    q = [n for n in model.graph if n.op_type == "QMoE"]
    assert len(q) == 1 and q[0].inputs[2].const_value.dtype == ir.DataType.UINT8 and q[0].inputs[2].const_value.shape[2] == 64 // 2
    got = sessions.run_ir_model(model, feeds)[0]["y"]
    spec = QuantSpec("uint4", symmetric=symmetric, granularity="block", block_size=32)
    ref_model, _, _ = _single_moe(np.random.default_rng(0))
    ref_model.graph.initializers["fc1"].const_value = ir.tensor(_dequantized(fc1, spec), name="fc1")
    ref_model.graph.initializers["fc2"].const_value = ir.tensor(_dequantized(fc2, spec), name="fc2")
    want = sessions.run_ir_model(ref_model, feeds)[0]["y"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_qmoe_block_size_fits_the_expert_widths():
    """Block 128 on experts 64 and 32 wide: reduced to 32 (counted), and the 8-bit QMoE stays close."""
    rng = np.random.default_rng(1)
    model, _, _ = _single_moe(rng)
    feeds = [{"x": rng.standard_normal((9, 64)).astype(np.float32), "r": rng.standard_normal((9, 4)).astype(np.float32)}]
    want = sessions.run_ir_model(model, feeds)[0]["y"]
    p = get_pass("quantize-moe")(bits=8, block_size=128)
    p(model)
    assert p.counters["block_size_reduced"] == 1
    q = next(n for n in model.graph if n.op_type == "QMoE")
    assert q.attributes["block_size"].as_int() == 32 and q.attributes["expert_weight_bits"].as_int() == 8
    got = sessions.run_ir_model(model, feeds)[0]["y"]
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_total_and_active_parameters(exported, tmp_path):
    """inspect, the compile manifest and bench's bytes per step count experts by what a token uses:
    Mixtral tiny, 2 layers × 4 experts × (gate/up 2·128×64 + down 64×128), top-2."""
    from llmopt.frontend.inspector import inspect_model
    from llmopt.ort.bench import weight_bytes

    expert_count = 2 * 4 * (2 * 128 * 64 + 64 * 128)
    src = exported("mixtral")
    art = llmopt.compile(src, target="cpu-fp32", out=tmp_path / "fp32")
    for split in (inspect_model(src)["parameters"]["experts"], art.manifest["artifact"]["experts"]):
        assert split["blocks"] == LAYERS and split["experts"] == [4] and split["k"] == [2]
        assert split["expert_count"] == expert_count and split["expert_bytes"] == 4 * expert_count
    total = inspect_model(src)["parameters"]["count"]
    assert inspect_model(src)["parameters"]["experts"]["total_count"] == total
    assert inspect_model(src)["parameters"]["experts"]["active_count"] == total - expert_count // 2
    from llmopt.reporting.summary import format_compile_report

    assert "experts   2 blocks of 4 experts, top-2, 2 fused" in format_compile_report(art.manifest, art.path)
    w = weight_bytes(art.path)
    assert w.expert_bytes == 4 * expert_count
    assert w.read_per_step(1) == w.total - w.gathered + w.row_bytes - w.expert_bytes // 2  # k/E of the experts
    assert w.read_per_step(64) > w.total - w.gathered - 0.01 * w.expert_bytes  # 64 tokens: nearly every expert


def test_kv_cache_and_prune_keep_working_on_moe_graphs(exported, tmp_path):
    """An export without a cache (torch.export read its dims off attention_mask) gets one added
    around the fused experts and generates what it computes; pruning runs beside quantize-moe."""
    src = exported("mixtral", False)
    art = llmopt.compile(src, target="cpu-fp32", out=tmp_path / "fp32")
    counters = {p["name"]: p["counters"] for p in art.manifest["passes"]}
    assert counters["fuse"]["moe"] == LAYERS and counters["kv-cache"]["layers_given_cache"] == LAYERS
    assert Generator(art.path).generate([PROMPT], 32).tokens[0] == greedy_by_recompute(src, PROMPT, 32)
    pruned = llmopt.compile(exported("mixtral"), target="cpu-int4", out=tmp_path / "pruned",
                            passes="fold,cleanup,fuse,prune{sparsity=0.3},kv-cache,quantize-moe{bits=4},cleanup")
    counters = {p["name"]: p["counters"] for p in pruned.manifest["passes"]}
    assert pruned.manifest["verification"]["passed"] and counters["prune"]["zeros"] > 0
    assert counters["quantize-moe"]["moe"] == LAYERS


def _compile_and_generate(exported, arch, tmp_path, targets):
    src = exported(arch)  # with KV-cache I/O
    for target in targets:
        art = llmopt.compile(src, target=target, out=tmp_path / target)
        assert art.manifest["verification"]["passed"], (target, art.manifest["verification"])
        counters = {p["name"]: p["counters"] for p in art.manifest["passes"]}
        assert counters["fuse"]["moe"] == LAYERS, (target, counters["fuse"])
        if target == "cpu-fp32":
            assert art.manifest["verification"]["figures"]["max_abs"] < 1e-4
            assert Generator(art.path).generate([PROMPT], 32).tokens[0] == greedy_by_recompute(src, PROMPT, 32)
        else:
            assert counters["quantize-moe"]["moe"] == LAYERS


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_decoders_export_compile_and_generate(exported, arch, tmp_path):
    _compile_and_generate(exported, arch, tmp_path, ["cpu-fp32"] + (["cpu-int4"] if arch == "mixtral" else []))


# Random tiny weights miss two targets' default budgets (measured 2026-12-03, experts fused and in
# QMoE): Granite-MoE's logits are nearly flat, so int4 keeps cosine ~0.987 but no argmax (top-1 0.0
# < 0.4); gpt-oss at int8 has cosine 0.98909 < 0.99, from its dense layers (the experts alone,
# quantize-moe bits=8: 0.99998). Strict: when they start passing, the marks must go.
_MISSES = {"granitemoe": "cpu-int4 top-1 0.0 on flat random logits", "gpt_oss": "cpu-int8 cosine 0.98909 < 0.99 (dense int8; its experts alone: 0.99998)"}


@SLOW
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.xfail(strict=True, reason=_MISSES[a]))
                                  if a in _MISSES else a for a in MOE])
def test_every_moe_architecture_at_every_cpu_target(exported, arch, tmp_path):
    _compile_and_generate(exported, arch, tmp_path, ["cpu-fp32", "cpu-int8", "cpu-int4"])

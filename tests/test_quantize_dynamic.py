"""quantize-dynamic: exact graph rewrites on small graphs, numerics on real exports."""

import numpy as np
import onnx_ir as ir
import pytest

import llmopt
from llmopt import verify
from llmopt.models.architectures import ARCHITECTURES
from llmopt.registry import get_pass


def _graph(build):
    """A model with a float input x [2,3,64] and int64 ids [2,3]; ``build(graph, x, ids, init)`` adds nodes."""
    x = ir.Value(name="x", shape=ir.Shape([2, 3, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    ids = ir.Value(name="ids", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.INT64))
    graph = ir.Graph([x, ids], [], nodes=[], opset_imports={"": 20}, name="g")
    rng = np.random.default_rng(0)

    def init(name, shape):
        v = ir.Value(name=name, const_value=ir.tensor(rng.standard_normal(shape).astype(np.float32), name=name))
        graph.register_initializer(v)
        return v

    outs = build(graph, x, ids, init)
    for i, o in enumerate(outs):
        o.name = f"y{i}"
        graph.outputs.append(o)
    return ir.Model(graph, ir_version=10)


def _run(model, feeds):
    return verify.run_ir_model(model, [feeds])[0]


def _feeds():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((2, 3, 64)).astype(np.float32), "ids": rng.integers(0, 100, (2, 3))}


def _ops(model):
    return [n.op_type for n in model.graph]


def test_matmul_with_bias_becomes_one_dynamic_quantize_matmul():
    def build(g, x, ids, init):
        mm = ir.node("MatMul", [x, init("w", (64, 128))])
        add = ir.node("Add", [mm.outputs[0], init("b", (128,))])
        g.extend([mm, add])
        return [add.outputs[0]]

    model = _graph(build)
    ref = _run(model, _feeds())
    p = get_pass("quantize-dynamic")(kernel="dynamic")
    assert p(model).modified
    assert _ops(model) == ["DynamicQuantizeMatMul"]
    node = next(iter(model.graph))
    assert node.domain == "com.microsoft" and len(node.inputs) == 5 and node.inputs[3] is None
    assert node.inputs[1].const_value.dtype == ir.DataType.INT8
    assert list(node.inputs[2].const_value.shape) == [128]  # per output channel
    assert set(model.graph.initializers) == {"w_int8", "w_scale", "b"}
    assert dict(p.counters) == {"matmul": 1, "bias_folded": 1}
    out = _run(model, _feeds())
    np.testing.assert_allclose(out["y0"], ref["y0"], atol=0.03 * np.abs(ref["y0"]).max())
    assert verify.compare(ref, out).cosine > 0.9995


def test_matmul_with_bias_becomes_matmul_nbits_8bit():
    def build(g, x, ids, init):
        mm = ir.node("MatMul", [x, init("w", (64, 128))])
        add = ir.node("Add", [init("b", (128,)), mm.outputs[0]])  # bias on the left
        g.extend([mm, add])
        return [add.outputs[0]]

    model = _graph(build)
    ref = _run(model, _feeds())
    p = get_pass("quantize-dynamic")(block_size=32)
    assert p(model).modified
    assert _ops(model) == ["MatMulNBits"]
    node = next(iter(model.graph))
    attrs = {k: v.value for k, v in node.attributes.items()}
    assert attrs == {"K": 64, "N": 128, "bits": 8, "block_size": 32, "accuracy_level": 4}
    assert node.inputs[1].const_value.dtype == ir.DataType.UINT8
    assert list(node.inputs[1].const_value.shape) == [128, 2, 32]  # [N, K / block, block]
    assert list(node.inputs[2].const_value.shape) == [128 * 2]
    assert node.inputs[5].name == "b"
    assert dict(p.counters) == {"matmul": 1, "bias_folded": 1}
    out = _run(model, _feeds())
    np.testing.assert_allclose(out["y0"], ref["y0"], atol=0.03 * np.abs(ref["y0"]).max())
    assert verify.compare(ref, out).cosine > 0.9995


def test_tied_embedding_gather_and_transposed_matmul():
    def build(g, x, ids, init):
        e = init("embed", (100, 64))
        gather = ir.node("Gather", [e, ids], attributes={"axis": 0})
        tr = ir.node("Transpose", [e], attributes={"perm": [1, 0]})
        mm = ir.node("MatMul", [x, tr.outputs[0]])
        g.extend([gather, tr, mm])
        return [gather.outputs[0], mm.outputs[0]]

    model = _graph(build)
    ref = _run(model, _feeds())
    p = get_pass("quantize-dynamic")()
    assert p(model).modified
    assert sorted(_ops(model)) == ["Cast", "Gather", "Gather", "MatMulNBits", "Mul"]
    assert "embed" not in model.graph.initializers  # float table dropped, Transpose gone
    assert dict(p.counters) == {"matmul": 1, "gather": 1}
    out = _run(model, _feeds())
    rows = _feeds()["ids"]
    # dequantized rows are within half a quantization step of the original
    table = np.random.default_rng(0).standard_normal((100, 64)).astype(np.float32)
    step = np.abs(table).max(1) / 127
    assert np.all(np.abs(out["y0"] - ref["y0"]) <= step[rows][..., None] / 2 + 1e-6)
    assert verify.compare({"l": ref["y1"]}, {"l": out["y1"]}).cosine > 0.9995


def test_small_excluded_and_non_constant_weights_untouched():
    def build(g, x, ids, init):
        small = ir.node("MatMul", [x, init("small", (64, 8))])  # 512 elements < min_elements
        named = ir.node("MatMul", [x, init("lm_head.w", (64, 128))])
        dyn = ir.node("MatMul", [x, ir.node("Transpose", [x], attributes={"perm": [0, 2, 1]}).outputs[0]])
        g.extend([small, named, dyn.inputs[1].producer(), dyn])
        return [small.outputs[0], named.outputs[0], dyn.outputs[0]]

    model = _graph(build)
    p = get_pass("quantize-dynamic")(exclude=("lm_head*",))
    assert not p(model).modified
    assert dict(p.counters) == {"excluded": 1}
    assert _ops(model).count("MatMul") == 3


@pytest.mark.parametrize("kernel", ["nbits", "dynamic"])
def test_gemm_with_transb_and_alpha(kernel):
    def build(g, x, ids, init):
        r = ir.node("Reshape", [x, ir.Value(name="shp", const_value=ir.tensor(np.array([6, 64], np.int64), name="shp"))])
        g.register_initializer(r.inputs[1])
        gemm = ir.node("Gemm", [r.outputs[0], init("w", (128, 64)), init("c", (128,))], attributes={"transB": 1, "alpha": 0.5})
        g.extend([r, gemm])
        return [gemm.outputs[0]]

    model = _graph(build)
    ref = _run(model, _feeds())
    assert get_pass("quantize-dynamic")(kernel=kernel)(model).modified
    assert _ops(model) == ["Reshape", {"nbits": "MatMulNBits", "dynamic": "DynamicQuantizeMatMul"}[kernel]]
    out = _run(model, _feeds())
    assert verify.compare(ref, out).cosine > 0.9995


def test_bad_options():
    from llmopt.errors import PipelineError
    from llmopt.pipeline import parse

    for text, match in [("quantize-dynamic{block_size=48}", "power of two"), ("quantize-dynamic{kernel=fast}", "nbits, dynamic"),
                        ("quantize-dynamic{accuracy_level=9}", "0..4")]:
        with pytest.raises(PipelineError, match=match):
            parse(text).validate()


@pytest.mark.parametrize("kernel", ["nbits", "dynamic"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_real_exports_before_and_after(exported, arch, kernel):
    path = exported(arch, True)
    model = llmopt.load(path)
    shapes = verify.default_shapes(True)
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(shapes)]
    before = verify.run_ir_model(model, feeds)
    p = get_pass("quantize-dynamic")(min_elements=0, kernel=kernel, block_size=16)  # tiny: quantize every weight
    assert p(model).modified
    assert p.counters["matmul"] >= 2 * 4 and p.counters["gather"] >= 1
    assert not any(n.op_type in ("MatMul", "Gemm") and n.inputs[1].is_initializer() for n in model.graph)
    after = verify.run_ir_model(model, feeds)
    figs = verify.worst([verify.compare(b, a) for b, a in zip(before, after)])
    assert figs.cosine > 0.999 and figs.max_abs < 0.05 and figs.top1 >= 0.8

import numpy as np
import onnx_ir as ir

import llmopt
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.core.registry import get_pass


def _model_with_constant_subgraph():
    x = ir.Value(name="x", shape=ir.Shape([4]), type=ir.TensorType(ir.DataType.FLOAT))
    a = ir.Value(name="a", const_value=ir.tensor(np.arange(4, dtype=np.float32), name="a"))
    b = ir.Value(name="b", const_value=ir.tensor(np.full(4, 2, np.float32), name="b"))
    mul = ir.node("Mul", [a, b])
    neg = ir.node("Neg", [mul.outputs[0]])
    add = ir.node("Add", [x, neg.outputs[0]])
    add.outputs[0].name = "y"
    g = ir.Graph([x], [add.outputs[0]], nodes=[mul, neg, add], initializers=[a, b], opset_imports={"": 20})
    return ir.Model(g, ir_version=10)


def test_fold_evaluates_constant_nodes():
    model = _model_with_constant_subgraph()
    feeds = [{"x": np.ones(4, np.float32)}]
    before = sessions.run_ir_model(model, feeds)
    p = get_pass("fold")()
    assert p(model).modified
    assert [n.op_type for n in model.graph] == ["Add"]
    assert p.counters == {"folded.Mul": 1, "folded.Neg": 1}
    after = sessions.run_ir_model(model, feeds)
    np.testing.assert_array_equal(before[0]["y"], after[0]["y"])
    assert not p(model).modified  # fixed point reached


def test_fold_respects_size_limit():
    model = _model_with_constant_subgraph()
    p = get_pass("fold")(input_size_limit=2)
    assert not p(model).modified
    assert len(list(model.graph)) == 3


def test_fold_on_export_keeps_numerics(exported):
    path = exported("gpt2", False)
    model = llmopt.load(path)
    feeds = [verify.sample_inputs(model, s) for s in verify.default_shapes(False)]
    before = sessions.run_ir_model(model, feeds)
    get_pass("fold")()(model)
    after = sessions.run_ir_model(model, feeds)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)

import numpy as np
import onnx_ir as ir

import llmopt
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.core.registry import get_pass


def _model():
    x = ir.Value(name="x", shape=ir.Shape([2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((4, 4), np.float32), name="w"))
    unused = ir.Value(name="unused", const_value=ir.tensor(np.ones(8, np.float32), name="unused"))
    r1 = ir.node("Relu", [x])
    r2 = ir.node("Relu", [x])  # common subexpression of r1
    ident = ir.node("Identity", [r2.outputs[0]])
    add = ir.node("Add", [r1.outputs[0], ident.outputs[0]])
    dead = ir.node("MatMul", [x, w])  # result never used
    add.outputs[0].name = "y"
    g = ir.Graph([x], [add.outputs[0]], nodes=[dead, r1, r2, ident, add], initializers=[w, unused],
                 opset_imports={"": 20, "com.microsoft": 1})
    return ir.Model(g, ir_version=10)


def test_cleanup_removes_dead_code_duplicates_identities_and_initializers():
    model = _model()
    feeds = [{"x": np.arange(8, dtype=np.float32).reshape(2, 4) - 3}]
    before = sessions.run_ir_model(model, feeds)
    p = get_pass("cleanup")()
    assert p(model).modified
    assert [n.op_type for n in model.graph] == ["Relu", "Add"]
    assert len(model.graph.initializers) == 0
    assert "com.microsoft" not in model.opset_imports
    assert p.counters["nodes_removed"] == 3 and p.counters["initializers_removed"] == 2
    add = list(model.graph)[1]
    assert add.outputs[0].shape == ir.Shape([2, 4])  # shape inference ran
    after = sessions.run_ir_model(model, feeds)
    np.testing.assert_array_equal(before[0]["y"], after[0]["y"])
    assert not get_pass("cleanup")()(model).modified  # idempotent: a fixed point


def test_cleanup_on_export_keeps_numerics(exported):
    model = llmopt.load(exported("qwen2", True))
    feeds = [verify.sample_inputs(model, s) for s in verify.default_shapes(True)]
    before = sessions.run_ir_model(model, feeds)
    get_pass("cleanup")()(model)
    after = sessions.run_ir_model(model, feeds)
    for b, a in zip(before, after):
        for k in b:
            np.testing.assert_allclose(a[k], b[k], atol=1e-5)

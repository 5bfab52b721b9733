"""onnx-graphsurgeon passes run as llmopt passes (llmopt.core.graphsurgeon)."""

import dataclasses
import subprocess
import sys
import uuid

import numpy as np
import onnx_graphsurgeon as gs
import onnx_ir as ir
import pytest

from llmopt.core import graphsurgeon as lgs
from llmopt.core import model_io
from llmopt.core import registry
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.errors import MissingDependencyError, PipelineError
from llmopt.core.graphsurgeon import GraphSurgeonPass, graphsurgeon_pass
from llmopt.core.manager import run_pipeline


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def register():
    """register(cls) -> cls.name; the registry entries are removed after the test."""
    names = []

    def add(cls):
        registry.register_pass(cls)
        names.append(cls.name)
        return cls.name

    yield add
    for name in names:
        registry._PASSES.pop(name, None)
        getattr(registry, "_ORIGINS", {}).pop(name, None)


@pytest.fixture
def llama(exported):
    path = exported("llama", True)
    return path, model_io.load(path)


def _feeds(model):
    return [verify.sample_inputs(model, s) for s in verify.default_shapes(True)]


def _ops(model, op):
    return sum(1 for n in model.graph if n.op_type == op)


def _external(model):
    inits = model.graph.initializers
    return {k: v.const_value for k, v in inits.items() if isinstance(v.const_value, ir.ExternalTensor)}


def insert_identities(graph: gs.Graph) -> gs.Graph:
    """Put an Identity after every MatMul."""
    for node in [n for n in graph.nodes if n.op == "MatMul"]:
        out = node.outputs[0]
        mid = gs.Variable(out.name + "_pre_identity", dtype=out.dtype, shape=out.shape)
        node.outputs[0] = mid
        graph.nodes.append(gs.Node("Identity", inputs=[mid], outputs=[out]))
    return graph.toposort()


@dataclasses.dataclass(frozen=True)
class RemoveOptions:
    op: str = "Identity"


class RemovePassThrough(GraphSurgeonPass):
    """Remove single-input pass-through nodes (Identity by default), the graphsurgeon way."""

    summary = "remove pass-through nodes"
    Options = RemoveOptions

    def run_graph(self, graph):
        for node in [n for n in graph.nodes if n.op == self.options.op]:
            src, dst = node.inputs[0], node.outputs[0]
            if dst in graph.outputs:  # keep the output's name: the producer of src writes dst instead
                if not src.inputs or src in graph.outputs or len(src.outputs) != 1:
                    continue
                producer = src.inputs[0]
                node.outputs.clear()
                producer.outputs[producer.outputs.index(src)] = dst
                continue
            for consumer in list(dst.outputs):
                consumer.inputs[consumer.inputs.index(dst)] = src
            node.outputs.clear()
        return graph.cleanup().toposort()


def test_rewrite_through_pipeline_keeps_numerics(llama, register, tmp_path):
    path, model = llama
    feeds = _feeds(model)
    before = sessions.run_ir_model(model, feeds)
    nodes0, matmuls = len(model.graph), _ops(model, "MatMul")
    assert matmuls > 0 and _ops(model, "Identity") == 0

    ins = register(graphsurgeon_pass(_unique("gs-insert"))(insert_identities))
    rm = register(type("Remove", (RemovePassThrough,), {"name": _unique("gs-remove")}))

    result = run_pipeline(model, ins)
    assert result.modified and result.records[0].modified
    assert _ops(model, "Identity") == matmuls and len(model.graph) == nodes0 + matmuls
    assert result.records[0].nodes_after == nodes0 + matmuls
    out = model_io.save(model, tmp_path / "inserted" / "model.onnx")
    mid = sessions.run_path(out, feeds)

    result = run_pipeline(model, f"{rm}{{op=Identity}}")
    assert result.modified
    assert _ops(model, "Identity") == 0 and len(model.graph) == nodes0
    out = model_io.save(model, tmp_path / "removed" / "model.onnx")
    after = sessions.run_path(out, feeds)
    for b, m, a in zip(before, mid, after):
        np.testing.assert_allclose(m["logits"], b["logits"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-6)
        figs = verify.compare(b, a)
        assert figs.max_abs <= 1e-6 and figs.other_max_abs <= 1e-6

    # nothing left to remove: not modified, and the model is left exactly as it was
    graph = model.graph
    result = run_pipeline(model, rm)
    assert not result.modified and not result.records[0].modified
    assert model.graph is graph


def test_noop_pass_is_not_a_modification(llama):
    _, model = llama
    graph = model.graph

    @graphsurgeon_pass("gs-noop")
    def noop(g):
        return g.cleanup().toposort()  # round trip, re-sort: no structural change

    p = noop()
    assert not p(model).modified
    assert model.graph is graph


def test_weights_stay_external_and_files_untouched(llama):
    path, model = llama
    files = model_io.model_files(path, model)
    digest = model_io.sha256_files(files)
    external = _external(model)
    assert len(external) >= 10

    # tensors an earlier pass made: one in memory, one lazy (must not be evaluated)
    inits = model.graph.initializers
    big = sorted(external, key=lambda k: external[k].nbytes)
    in_memory_name, lazy_name = big[-1], big[-2]
    in_memory = ir.tensor(np.array(external[in_memory_name].numpy()), name=in_memory_name)
    inits[in_memory_name].const_value = in_memory
    source, calls = external[lazy_name], []

    def evaluate():
        calls.append(1)
        return ir.tensor(source.numpy())

    lazy = ir.LazyTensor(evaluate, dtype=source.dtype, shape=source.shape, name=lazy_name)
    inits[lazy_name].const_value = lazy
    for name in (in_memory_name, lazy_name):
        del external[name]
    feeds = _feeds(model)
    before = sessions.run_ir_model(model, feeds)
    calls.clear()
    for t in external.values():  # a fresh mapping, to see what the conversion touches
        t.release()

    # called directly: the PassManager's guard around plugin passes runs the model in ORT
    p = graphsurgeon_pass("gs-insert")(insert_identities)()
    assert p(model).modified and not p.warnings
    assert p.counters["tensors_by_reference"] == len(external) + 2
    assert _ops(model, "Identity") == _ops(model, "MatMul")
    for name, t in external.items():
        now = model.graph.initializers[name].const_value
        assert now is t  # the very same memory-mapped tensor, same file and base_dir
        assert t.raw is None  # never read
    assert model.graph.initializers[in_memory_name].const_value is in_memory  # not copied
    assert model.graph.initializers[lazy_name].const_value is lazy and not calls  # not evaluated
    assert model_io.sha256_files(files) == digest

    after = sessions.run_ir_model(model, feeds)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-6)
    assert model_io.sha256_files(files) == digest


def test_reading_values_keeps_tensors_by_reference(llama):
    _, model = llama
    external = _external(model)
    seen = {}

    @graphsurgeon_pass("gs-read")
    def read(graph):
        for name, t in graph.tensors().items():
            if isinstance(t, gs.Constant):
                seen[name] = float(np.abs(t.values.astype(np.float64)).sum())
        weight = next(t for n, t in graph.tensors().items() if n in external)
        with pytest.raises(ValueError, match="read-only"):
            weight.values[...] = 0
        return graph

    p = read()
    assert not p(model).modified and not p.warnings
    assert set(external) <= set(seen)
    for name, t in external.items():
        assert model.graph.initializers[name].const_value is t
        assert seen[name] == float(np.abs(t.numpy().astype(np.float64)).sum())


def test_replaced_values_fall_back_to_loading_with_a_warning(llama, register, monkeypatch):
    _, model = llama
    external = _external(model)
    name = max(external, key=lambda k: external[k].nbytes)
    nbytes = external[name].nbytes
    feeds = _feeds(model)
    before = sessions.run_ir_model(model, feeds)

    @graphsurgeon_pass(_unique("gs-copy"))
    def copy(graph):
        """Replace one weight's values by a copy (same numbers, now in memory)."""
        const = graph.tensors()[name]
        const.values = np.array(const.values)
        return graph

    monkeypatch.setattr(lgs, "LOAD_WARN_BYTES", 0)
    result = run_pipeline(model, register(copy))
    assert result.modified
    (warning,) = result.warnings
    assert f"loaded {nbytes} bytes" in warning
    assert "too large to convert without loading all weights" in warning
    assert warning.startswith(copy.name + ": ")
    assert result.records[0].counters["bytes_loaded"] == nbytes
    now = model.graph.initializers[name].const_value
    assert not isinstance(now, ir.ExternalTensor)
    np.testing.assert_array_equal(now.numpy(), external[name].numpy())
    for other, t in external.items():
        if other != name:
            assert model.graph.initializers[other].const_value is t
    after = sessions.run_ir_model(model, feeds)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=1e-6)


def test_over_protobuf_limit_is_refused(llama, register, monkeypatch):
    _, model = llama
    graph = model.graph
    monkeypatch.setattr(lgs, "PROTOBUF_LIMIT_BYTES", 1000)
    name = register(graphsurgeon_pass(_unique("gs-insert"))(insert_identities))
    with pytest.raises(PipelineError, match=rf"pass '{name}'.*2 GiB limit"):
        run_pipeline(model, name)
    assert model.graph is graph and _ops(model, "Identity") == 0


def _mul_by_one_model():
    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    one = ir.Value(name="one", const_value=ir.tensor(np.array(1.0, np.float32), name="one"))
    two = ir.Value(name="two", const_value=ir.tensor(np.array(2.0, np.float32), name="two"))
    m1 = ir.node("Mul", [x, one], name="m1")
    m2 = ir.node("Mul", [m1.outputs[0], two], name="m2")
    relu = ir.node("Relu", [m2.outputs[0]], name="relu")
    relu.outputs[0].name = "y"
    relu.outputs[0].dtype = ir.DataType.FLOAT
    relu.outputs[0].shape = ir.Shape([2, 3])
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[m1, m2, relu], initializers=[one, two], opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def test_fold_mul_by_one_reading_small_constants():
    model = _mul_by_one_model()
    feeds = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2}]
    before = sessions.run_ir_model(model, feeds)

    @graphsurgeon_pass("gs-fold-mul-one")
    def fold(graph):
        for node in [n for n in graph.nodes if n.op == "Mul"]:
            c = node.inputs[1]
            if isinstance(c, gs.Constant) and np.all(c.values == 1):
                for consumer in list(node.outputs[0].outputs):
                    consumer.inputs[consumer.inputs.index(node.outputs[0])] = node.inputs[0]
                node.outputs.clear()
        return graph.cleanup().toposort()

    assert fold()(model).modified
    assert [n.name for n in model.graph] == ["m2", "relu"]
    assert list(model.graph.initializers) == ["two"]
    np.testing.assert_array_equal(sessions.run_ir_model(model, feeds)[0]["y"], before[0]["y"])
    assert not fold()(model).modified


def test_changed_small_constant_is_a_modification():
    model = _mul_by_one_model()

    @graphsurgeon_pass("gs-three")
    def three(graph):
        graph.tensors()["two"].values = np.array(3.0, np.float32)
        return graph

    assert three()(model).modified
    assert model.graph.initializers["two"].const_value.numpy() == 3.0


def test_decorator_builds_an_unregistered_pass_class():
    name = _unique("gs-deco")

    @graphsurgeon_pass(name)
    def strip(graph):
        """Strip things.

        More words.
        """
        return graph

    assert isinstance(strip, type) and issubclass(strip, GraphSurgeonPass)
    assert strip.name == name and strip.summary == "Strip things."
    assert name not in registry._PASSES
    assert graphsurgeon_pass("gs-x", "explicit")(strip.function).summary == "explicit"

    @dataclasses.dataclass(frozen=True)
    class Opts:
        op: str = "Relu"

    seen = []

    @graphsurgeon_pass("gs-opts", options=Opts)
    def with_options(graph, options):
        seen.append(options.op)
        return graph

    assert with_options.Options is Opts
    with_options(op="Tanh")(_mul_by_one_model())
    assert seen == ["Tanh"]


def test_run_graph_must_return_a_graph():
    name = _unique("gs-none")

    @graphsurgeon_pass(name)
    def forgot(graph):
        graph.cleanup()

    with pytest.raises(TypeError, match=rf"graphsurgeon pass '{name}'.*got None"):
        forgot()(_mul_by_one_model())

    class Wrong(GraphSurgeonPass):
        name = "gs-wrong"

        def run_graph(self, graph):
            return gs.export_onnx(graph)

    with pytest.raises(TypeError, match=r"'gs-wrong'.*ModelProto"):
        Wrong()(_mul_by_one_model())


def test_missing_graphsurgeon(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx_graphsurgeon", None)
    with pytest.raises(MissingDependencyError, match="pip install onnx-graphsurgeon"):
        graphsurgeon_pass("gs-missing")(lambda g: g)()(_mul_by_one_model())


def test_import_llmopt_does_not_import_graphsurgeon():
    code = "import sys, llmopt, llmopt.core.graphsurgeon; sys.exit('onnx_graphsurgeon' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

"""llmopt.quant: one site finder, one grid per spec, one lowering per kernel — checked in ONNX Runtime."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import llmopt
from llmopt.core.registry import get_pass
from llmopt.ort import sessions, verify
from llmopt.quant.sites import LinearSite, linear_site
from llmopt.quant.spec import QuantSpec
from llmopt.quant.tensor import quantize

REPO = Path(__file__).resolve().parents[1]


def _single_matmul(w: np.ndarray) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3, w.shape[0]]))
    wv = ir.Value(name="w", const_value=ir.tensor(w))
    node = ir.node("MatMul", [x, wv], name="mm")
    node.outputs[0].name = "y"
    return ir.Model(ir.Graph([x], node.outputs, nodes=[node], initializers=[wv], opset_imports={"": 21}), ir_version=10)


def _initializers(model):
    return {k.rsplit("_", 1)[-1]: v.const_value.numpy() for k, v in model.graph.initializers.items()}


def test_int8_blocks_are_one_grid_for_every_pass():
    """quantize-dynamic's MatMulNBits and weight-only{bits=8,symmetric=true} at the same block size
    emit the same bytes and compute the same numbers (they were on /127 and /127.5 grids)."""
    w = np.random.default_rng(0).normal(size=(256, 48)).astype(np.float32)
    x = {"x": np.random.default_rng(1).normal(size=(3, 256)).astype(np.float32)}
    a, b = _single_matmul(w), _single_matmul(w)
    assert get_pass("quantize-dynamic")(min_elements=0, block_size=64)(a).modified
    assert get_pass("weight-only")(bits=8, symmetric=True, block_size=64, min_elements=0)(b).modified
    ia, ib = _initializers(a), _initializers(b)
    np.testing.assert_array_equal(ia["q8"], ib["q8"])
    np.testing.assert_array_equal(ia["scales"], ib["scales"])
    ya, yb = (sessions.run_ir_model(m, [x])[0]["y"] for m in (a, b))
    np.testing.assert_array_equal(ya, yb)
    assert np.abs(ya - x["x"] @ w).max() < 0.02 * np.abs(x["x"] @ w).max()


@pytest.mark.parametrize("spec", [QuantSpec("int8", granularity="channel", axis=1), QuantSpec("int8"),
                                  QuantSpec("int8", granularity="channel", axis=1, reduce_range=True),
                                  QuantSpec("uint4", symmetric=True, granularity="block", block_size=32)])
def test_symmetric_grids_reach_amax_without_clipping(spec):
    w = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
    qt = quantize(w, spec)
    q = qt.q - qt.zero[..., None] if spec.granularity == "block" else qt.q - qt.zero
    assert np.abs(q).max() == spec.levels  # the largest |w| lands on the last level, exactly
    assert qt.spec.bits == (7 if spec.reduce_range else 4 if spec.dtype.endswith("4") else 8)
    assert 0 < qt.error(w) < (0.2 if spec.bits == 4 else 0.02)


def test_every_weight_pass_finds_the_same_sites(exported):
    """Quantizing, pruning and smoothing read weights through one finder: on a fused decoder, every
    plain site (what prune and smooth-quant rewrite in place) is a quantizable site."""
    model = llmopt.load(exported("llama"))
    llmopt.run_pipeline(model, "fold,cleanup,fuse")
    sites = {n.name: linear_site(n) for n in model.graph}
    plain = {n.name: linear_site(n, plain=True, fold_bias=False) for n in model.graph}
    quantizable = {k for k, s in sites.items() if isinstance(s, LinearSite)}
    prunable = {k for k, s in plain.items() if isinstance(s, LinearSite)}
    assert prunable and prunable <= quantizable
    # what only quantizers take: weights read through a Transpose or shared by several nodes
    assert all(sites[k].transposed or len(sites[k].weight.uses()) > 1 for k in quantizable - prunable)


def test_the_quantizing_pass_in_the_docs_is_short_and_right(exported, tmp_path):
    doc = (REPO / "docs" / "writing-passes.md").read_text()
    body = re.search(r"```python file=int8_channel.py\n(.*?)```", doc, re.S).group(1)
    assert len(body.splitlines()) < 80
    (tmp_path / "int8_channel.py").write_text(body)
    spec = importlib.util.spec_from_file_location("int8_channel_example", tmp_path / "int8_channel.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # not registered: the docs test may have registered its name already
    model = llmopt.load(exported("llama"))
    feeds = [verify.sample_inputs(model, verify.default_shapes(True)[1])]
    before = sessions.run_ir_model(model, feeds)[0]["logits"]
    llmopt.run_pipeline(model, "fold,cleanup,fuse")
    p = example.Int8PerChannel(min_elements=0)
    assert p(model).modified
    llmopt.run_pipeline(model, "cleanup")
    after = sessions.run_ir_model(model, feeds)[0]["logits"]
    assert p.counters["matmul"] >= 2 * 4 and "MatMul" in [n.op_type for n in model.graph]
    assert verify.compare({"logits": before}, {"logits": after}).cosine > 0.999

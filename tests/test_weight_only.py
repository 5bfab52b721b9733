"""weight-only: MatMulNBits int4/int8 runs in ORT and matches its own dequantized weights; GPTQ
lowers the output error against round-to-nearest; embedding tables become GatherBlockQuantized (a
tied lm_head's table shared); real exports keep their logits; per-weight errors land in the metadata."""

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import llmopt
from llmopt.core import model_io, graph_util
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.quant.lower import pack_nbits
from llmopt.quant.tensor import gptq, quantize
from llmopt.quant.spec import QUANT_ERROR_KEY, QuantSpec
from llmopt.core.registry import get_pass



def quantize_blocks(w, spec):
    """Round to nearest on ``spec``'s blocks: ``q, scale, zero`` in MatMulNBits' layout."""
    qt = quantize(w, spec)
    return qt.q, qt.scale, qt.zero

def _single_matmul(w: np.ndarray) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3, w.shape[0]]))
    wv = ir.Value(name="w", const_value=ir.tensor(w))
    node = ir.node("MatMul", [x, wv], name="mm")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[wv], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("bits, symmetric, block", [(4, False, 32), (4, True, 32), (8, False, 64), (4, False, 16)])
def test_matmulnbits_equals_dequantized_weights(bits, symmetric, block):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(80, 24)).astype(np.float32)  # K not a multiple of the block: padding
    x = rng.normal(size=(3, 80)).astype(np.float32)
    model = _single_matmul(w)
    p = get_pass("weight-only")(bits=bits, symmetric=symmetric, block_size=block, min_elements=0, accuracy_level=0)
    assert p(model).modified and p.counters["rtn"] == 1
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    got = sessions.run_ir_model(model, [{"x": x}])[0]["y"]
    spec = QuantSpec(dtype=f"uint{bits}", symmetric=symmetric, granularity="block", block_size=block)
    q, scale, zero = quantize_blocks(w, spec)
    deq = ((q - zero[..., None]) * scale[..., None]).reshape(24, -1)[:, :80].T
    np.testing.assert_allclose(got, x @ deq, rtol=1e-4, atol=1e-4)
    assert np.abs(got - x @ w).max() < (0.2 if bits == 4 else 0.02) * np.abs(x @ w).max()


def test_pack_nbits_layout():
    q = np.arange(16, dtype=np.int32).reshape(1, 1, 16) % 16
    packed, zp = pack_nbits(q, np.array([[3, 5, 7]]), 4, symmetric=False)
    assert packed.shape == (1, 1, 8) and packed[0, 0, 0] == 0x10 and packed[0, 0, 1] == 0x32
    assert zp.tolist() == [[0x53, 0x07]]


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    k, n = 64, 32
    mix = rng.normal(size=(k, k)) * 0.3 + np.eye(k)
    x = rng.normal(size=(2048, k)) @ mix  # correlated input channels, as in real activations
    w = rng.normal(size=(k, n)).astype(np.float32)
    spec = QuantSpec(dtype="uint4", symmetric=False, granularity="block", block_size=32)

    def out_err(q, s, z):
        deq = ((q - z[..., None]) * s[..., None]).reshape(n, -1)[:, :k].T
        return np.linalg.norm(x @ deq - x @ w)

    rtn, g = out_err(*quantize_blocks(w, spec)), out_err(*gptq(w, x.T @ x, spec))
    assert g < 0.8 * rtn, (g, rtn)


@pytest.mark.parametrize("pipeline", ["weight-only", "weight-only{bits=8,block_size=128}",
                                      "weight-only{method=gptq,calibration=random,samples=4,seq_len=16}"])
def test_real_export_keeps_logits(exported, pipeline):
    model = llmopt.load(exported("qwen2", True))
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(True))]
    before = sessions.run_ir_model(model, feeds)
    llmopt.run_pipeline(model, f"fold,cleanup,fuse,{pipeline},cleanup")
    assert any(n.op_type == "MatMulNBits" for n in model.graph)
    assert any(n.op_type == "GatherBlockQuantized" for n in model.graph)
    after = sessions.run_ir_model(model, feeds)
    for b, a in zip(before, after):
        assert verify.compare(b, a).cosine > 0.97
    errors = json.loads(model.metadata_props[QUANT_ERROR_KEY])
    assert all(e["pass"] == "weight-only" and 0 < e["rel_rmse"] < 0.2 for e in errors.values())
    gathered = {n.inputs[0].name for n in llmopt.load(exported("qwen2", True)).graph if n.op_type == "Gather"}
    methods = {name: e["method"] for name, e in errors.items()}
    assert {methods.pop(name) for name in gathered & set(methods)} == {"rtn"}  # a lookup is never GPTQ'd
    assert set(methods.values()) == {"gptq" if "gptq" in pipeline else "rtn"}


def test_gptq_without_calibration_text_is_a_clear_error_and_auto_falls_back(exported):
    from llmopt.errors import InputError

    with pytest.raises(InputError, match="tokenizer.json"):
        llmopt.run_pipeline(llmopt.load(exported("llama", True)), "weight-only{method=gptq}")
    result = llmopt.run_pipeline(llmopt.load(exported("llama", True)), "weight-only{method=auto}")
    assert any("rounded to nearest" in w for w in result.warnings)


# -- embeddings: GatherBlockQuantized ------------------------------------------------------------


def _table_model(v, h, *, tied=None, seed=0):
    """Gather(E[v, h], ids) -> y0; with ``tied`` also an lm_head on the same table -> y1: 'transpose'
    (MatMul(x, Transpose(E))), 'fused' (com.microsoft::FusedMatMul(x, E, transB=1)) or 'copy'
    (MatMul(x, W) with W an initializer equal to Eᵀ)."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((v, h)) * 0.02).astype(np.float32)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2, 3]))
    e = ir.Value(name="embed", const_value=ir.tensor(table, name="embed"))
    gather = ir.node("Gather", [e, ids], attributes={"axis": 0}, name="gather")
    nodes, inputs, outputs, initializers = [gather], [ids], [gather.outputs[0]], [e]
    if tied:
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, h]))
        inputs.append(x)
        if tied == "transpose":
            tr = ir.node("Transpose", [e], attributes={"perm": [1, 0]})
            nodes += [tr, ir.node("MatMul", [x, tr.outputs[0]], name="lm_head")]
        elif tied == "copy":
            w = ir.Value(name="lm_head_w", const_value=ir.tensor(np.ascontiguousarray(table.T), name="lm_head_w"))
            initializers.append(w)
            nodes.append(ir.node("MatMul", [x, w], name="lm_head"))
        else:
            nodes.append(ir.node("FusedMatMul", [x, e], domain="com.microsoft", attributes={"transB": 1}, name="lm_head"))
        outputs.append(nodes[-1].outputs[0])
    for i, o in enumerate(outputs):
        o.name = f"y{i}"
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": 21, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10), table


def _ids_x(h):
    rng = np.random.default_rng(1)
    return {"ids": np.array([[0, 5, 511], [7, 7, 100]], np.int64), "x": rng.standard_normal((2, 3, h)).astype(np.float32)}


def _dequantized_table(table, bits, symmetric, block):
    spec = QuantSpec(dtype=f"uint{bits}", symmetric=symmetric, granularity="block", block_size=block)
    q, scale, zero = quantize_blocks(table.T, spec)
    v, h = table.shape
    return ((q - zero[..., None]) * scale[..., None]).reshape(v, -1)[:, :h]


@pytest.mark.parametrize("bits, symmetric, block, h", [(4, False, 32, 64), (4, True, 32, 64), (8, False, 16, 64),
                                                       (8, True, 64, 64), (4, False, 32, 80), (4, False, 128, 64)])
def test_gather_block_quantized_equals_dequantized_table(bits, symmetric, block, h):
    """h=80 is not a multiple of 32 (a partial last block); block 128 > h (one partial block)."""
    model, table = _table_model(512, h)
    p = get_pass("weight-only")(bits=bits, symmetric=symmetric, block_size=block)
    assert p(model).modified and dict(p.counters) == {"gather": 1}
    node = next(iter(model.graph))
    assert [n.op_type for n in model.graph] == ["GatherBlockQuantized"] and node.domain == "com.microsoft"
    assert {k: a.value for k, a in node.attributes.items()} == {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}
    data = node.inputs[0].const_value
    assert data.dtype == ir.DataType.UINT8 and list(data.shape) == [512, h * bits // 8]
    assert list(node.inputs[2].const_value.shape) == [512, -(-h // block)]
    assert (len(node.inputs) == 3) == symmetric
    assert "embed" not in model.graph.initializers
    feeds = _ids_x(h)
    got = sessions.run_ir_model(model, [{"ids": feeds["ids"]}])[0]["y0"]
    np.testing.assert_allclose(got, _dequantized_table(table, bits, symmetric, block)[feeds["ids"]], rtol=1e-6, atol=1e-7)
    err = json.loads(model.metadata_props[QUANT_ERROR_KEY])
    assert list(err) == ["embed"]
    deq = _dequantized_table(table, bits, symmetric, block)
    expected = np.linalg.norm(deq - table) / np.linalg.norm(table)
    assert err["embed"] == {"rel_rmse": pytest.approx(expected, abs=2e-6), "pass": "weight-only", "bits": bits,
                            "method": "rtn", "block_size": block}


@pytest.mark.parametrize("tied", ["transpose", "fused", "copy"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_tied_embedding_shares_the_lm_head_table(tied, symmetric):
    model, table = _table_model(512, 64, tied=tied)
    feeds = _ids_x(64)
    ref = sessions.run_ir_model(model, [feeds])[0]
    p = get_pass("weight-only")(symmetric=symmetric)
    assert p(model).modified
    assert dict(p.counters) == {"matmul": 1, "rtn": 1, "gather": 1, "gather_shared": 1}
    ops = {n.op_type: n for n in model.graph}
    assert sorted(ops) == ["GatherBlockQuantized", "MatMulNBits", "Reshape"]
    gbq, mm = ops["GatherBlockQuantized"], ops["MatMulNBits"]
    assert gbq.inputs[0] is mm.inputs[1]  # one int4 table, read by both
    assert gbq.attributes["quantize_axis"].value == 2
    assert not {"embed", "lm_head_w"} & set(model.graph.initializers)  # float table(s) dropped, Transpose gone
    out = sessions.run_ir_model(model, [feeds])[0]
    np.testing.assert_allclose(out["y0"], _dequantized_table(table, 4, symmetric, 32)[feeds["ids"]], rtol=1e-6, atol=1e-7)
    assert verify.compare({"logits": ref["y1"]}, {"logits": out["y1"]}).cosine > 0.99
    # the table is stored once: int4 data + the lm_head's scales (+ zero points) + the Gather's copy of them
    data_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert data_bytes < table.nbytes / 8 + 2 * (512 * 2 * 4 + 512 * 2) + 64
    errors = json.loads(model.metadata_props[QUANT_ERROR_KEY])
    assert sorted(errors) == (["embed", "lm_head_w"] if tied == "copy" else ["embed"])
    assert len({e["rel_rmse"] for e in errors.values()}) == 1  # one quantized table


def test_tied_embedding_with_a_float_lm_head_keeps_the_float_table():
    model, table = _table_model(512, 64, tied="transpose")
    feeds = _ids_x(64)
    ref = sessions.run_ir_model(model, [feeds])[0]
    p = get_pass("weight-only")(exclude=("lm_head",))
    assert p(model).modified and dict(p.counters) == {"excluded": 1, "gather": 1}
    assert sorted(n.op_type for n in model.graph) == ["GatherBlockQuantized", "MatMul", "Transpose"]
    assert "embed" in model.graph.initializers  # the lm_head still reads it
    out = sessions.run_ir_model(model, [feeds])[0]
    np.testing.assert_array_equal(out["y1"], ref["y1"])
    np.testing.assert_allclose(out["y0"], _dequantized_table(table, 4, False, 32)[feeds["ids"]], rtol=1e-6, atol=1e-7)


def test_gather_kernel_rows_and_gather_off():
    model, _ = _table_model(512, 64)
    p = get_pass("weight-only")(gather_kernel="rows")
    assert p(model).modified and dict(p.counters) == {"gather": 1}
    assert sorted(n.op_type for n in model.graph) == ["Cast", "Gather", "Gather", "Mul"]
    assert json.loads(model.metadata_props[QUANT_ERROR_KEY])["embed"]["bits"] == 8
    model, _ = _table_model(512, 64)
    assert not get_pass("weight-only")(gather=False)(model).modified
    assert QUANT_ERROR_KEY not in model.metadata_props


def _float_weights(model):
    return {name: v.const_value.nbytes for name, v in model.graph.initializers.items()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2}


@pytest.mark.parametrize("arch", ["llama", "gemma"])  # gemma ties its lm_head to the embedding table
def test_real_export_embeddings_keep_logits_and_shrink(exported, arch):
    src = llmopt.load(exported(arch, True))
    feeds = [verify.sample_inputs(src, s, i) for i, s in enumerate(verify.default_shapes(True))]
    llmopt.run_pipeline(src, "fold,cleanup,fuse")
    (embed,) = [n.inputs[0].name for n in src.graph if n.op_type == "Gather" and n.inputs[0].is_initializer()]
    table_bytes = src.graph.initializers[embed].const_value.nbytes
    fused = model_io.save(src, Path(tempfile.mkdtemp()) / "fused.onnx")
    before = sessions.run_ir_model(src, feeds)
    results = {}
    for pipeline in ["weight-only{gather=false}", "weight-only", "weight-only{bits=8}"]:
        model = llmopt.load(fused)
        floats = _float_weights(model)
        res = llmopt.run_pipeline(model, f"{pipeline},cleanup")
        rec = next(r for r in res.records if r.name == "weight-only")
        figs = verify.worst([verify.compare(b, a) for b, a in zip(before, sessions.run_ir_model(model, feeds))])
        errors = json.loads(model.metadata_props[QUANT_ERROR_KEY])
        # one entry per quantized float weight: the ones the pass replaced (with gather=false, gemma's
        # lm_head is quantized but its table stays in float for the Gather)
        kept = {embed} if arch == "gemma" and "gather=false" in pipeline else set()
        assert set(errors) == set(floats) - set(_float_weights(model)) | kept, pipeline
        results[pipeline] = (model, rec, figs, errors, graph_util.initializer_bytes(model))
    _, _, figs_float, _, bytes_float = results["weight-only{gather=false}"]
    model, rec, figs, errors, nbytes = results["weight-only"]
    gbq = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == rec.counters["gather"] == 1 and embed not in model.graph.initializers
    assert rec.counters.get("gather_shared", 0) == (arch == "gemma")
    assert nbytes < bytes_float - 0.8 * table_bytes  # the float table is really gone
    assert figs.cosine > 0.97 and figs.cosine > figs_float.cosine - 0.01, (figs, figs_float)
    # int4 errors: larger than int8's on every weight; all within sane bounds
    _, _, figs8, errors8, _ = results["weight-only{bits=8}"]
    assert figs8.cosine > 0.999 and figs8.top1 >= 0.75
    assert errors.keys() == errors8.keys() and embed in errors
    for name, e in errors.items():
        e8 = errors8[name]
        assert (e["pass"], e["bits"], e["method"], e["block_size"]) == ("weight-only", 4, "rtn", 32)
        assert (e8["bits"], e8["block_size"]) == (8, 32)
        assert 0 < e8["rel_rmse"] < 0.02 and e8["rel_rmse"] < e["rel_rmse"] < 0.2, (name, e, e8)


def test_errors_merge_with_an_earlier_pass(exported):
    model = llmopt.load(exported("llama", True))
    llmopt.run_pipeline(model, "quantize-dynamic{gather=false},weight-only{method=rtn}")
    errors = json.loads(model.metadata_props[QUANT_ERROR_KEY])
    by_pass = {e["pass"] for e in errors.values()}
    assert by_pass == {"quantize-dynamic", "weight-only"}
    (embed,) = [k for k, e in errors.items() if e["pass"] == "weight-only"]
    assert "embed" in embed and errors[embed]["bits"] == 4
    assert sum(e["pass"] == "quantize-dynamic" for e in errors.values()) >= 8


def test_range_search_lowers_the_weighted_error_it_minimizes():
    """scales=search: per block, the clipped range with the least importance-weighted squared error;
    never worse than the block's min/max (the grid starts at the full range)."""
    from llmopt.quant.spec import blocks
    from llmopt.quant.tensor import search_range

    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(128, 64)).astype(np.float32)  # heavy tails: outliers to clip
    imp = rng.uniform(0.1, 2.0, size=128)
    spec = QuantSpec(dtype="uint4", symmetric=False, granularity="block", block_size=32)
    b = blocks(w, 32)

    def werr(scale, zero):
        dq = (spec.quantize(b, scale[..., None], zero[..., None]) - zero[..., None]) * scale[..., None]
        return float((((dq - b) ** 2) * imp.reshape(4, 32)).sum())

    full = werr(*spec.scale_zero_point(b.min(axis=-1), b.max(axis=-1)))
    searched = werr(*search_range(b, spec, imp.reshape(4, 32)))
    assert searched < 0.97 * full, (searched, full)
    qt = quantize(w, spec, search=True, importance=imp)
    assert werr(qt.scale, qt.zero) == pytest.approx(searched, rel=1e-6)


def test_search_gptq_and_8bit_tables_keep_logits_closer(exported):
    """cpu-int4's table choices, run in ONNX Runtime before and after: 8-bit embedding tables
    (table_bits) and lm_head (head_bits) each bring the logits closer to fp32. (Range search is
    checked above on the error it minimizes, and on the trained reference model by
    benchmarks/int4_methods.py: on a random tiny model it need not move the logits either way.)"""
    model0 = llmopt.load(exported("llama", True))
    llmopt.run_pipeline(model0, "fold,cleanup,fuse,cleanup")
    feeds = [verify.sample_inputs(model0, s, i) for i, s in enumerate(verify.default_shapes(True))]
    before = sessions.run_ir_model(model0, feeds)

    def err(options):
        model = llmopt.load(exported("llama", True))
        llmopt.run_pipeline(model, "fold,cleanup,fuse,cleanup")
        res = llmopt.run_pipeline(model, f"weight-only{{method=rtn,{options}}}")
        after = sessions.run_ir_model(model, feeds)
        return float(np.mean([np.abs(b["logits"] - a["logits"]).mean() for b, a in zip(before, after)])), res.records[0].counters, model

    base, _, _ = err("block_size=32")
    tables, counters, model = err("block_size=32,table_bits=8")
    assert counters["gather_8bit"] == 1 and tables < base
    gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    assert gbq.attributes["bits"].value == 8 and gbq.attributes["block_size"].value == 128
    both, counters, model = err("block_size=32,table_bits=8,head_bits=8")
    assert counters["lm_head_8bit"] == 1 and both < tables
    assert sorted(n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits").count(8) == 1


def test_tied_table_stays_shared_when_table_bits_differ():
    """A tied lm_head rounded to nearest shares its bytes with the table: table_bits does not split them."""
    model, table = _table_model(512, 64, tied="transpose")
    p = get_pass("weight-only")(table_bits=8)
    assert p(model).modified and p.counters["gather_shared"] == 1 and "gather_8bit" not in p.counters

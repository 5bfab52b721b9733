"""weight-only: MatMulNBits int4/int8 runs in ORT and matches its own dequantized weights; GPTQ
lowers the output error against round-to-nearest; real exports keep their logits."""

import numpy as np
import onnx_ir as ir
import pytest

import llmopt
from llmopt import verify
from llmopt.passes.weight_only import gptq, pack_nbits, quantize_blocks
from llmopt.quant_spec import QuantSpec
from llmopt.registry import get_pass


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
    got = verify.run_ir_model(model, [{"x": x}])[0]["y"]
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
    before = verify.run_ir_model(model, feeds)
    llmopt.run_pipeline(model, f"fold,cleanup,fuse,{pipeline},cleanup")
    assert any(n.op_type == "MatMulNBits" for n in model.graph)
    after = verify.run_ir_model(model, feeds)
    for b, a in zip(before, after):
        assert verify.compare(b, a).cosine > 0.97


def test_gptq_without_calibration_text_is_a_clear_error_and_auto_falls_back(exported):
    from llmopt.errors import InputError

    with pytest.raises(InputError, match="tokenizer.json"):
        llmopt.run_pipeline(llmopt.load(exported("llama", True)), "weight-only{method=gptq}")
    result = llmopt.run_pipeline(llmopt.load(exported("llama", True)), "weight-only{method=auto}")
    assert any("rounded to nearest" in w for w in result.warnings)

"""qdq: calibrated static int8 in QDQ form runs in ORT and keeps the logits, recording each weight's
quantization error; cuda-int8 refuses ops the CUDA provider lacks."""

import json

import onnx_ir as ir
import pytest

import llmopt
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.errors import VerificationError
from llmopt.quant.spec import QUANT_ERROR_KEY


def _float_weights(model):
    return {name for name, v in model.graph.initializers.items()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2}


@pytest.mark.parametrize("options", ["", "{activations=uint8,method=percentile}", "{method=entropy,per_channel=false}"])
def test_qdq_keeps_logits(exported, options):
    model = llmopt.load(exported("llama", True))
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(True))]
    before = sessions.run_ir_model(model, feeds)
    opts = options.rstrip("}") + ("," if options else "{") + "calibration=random,samples=4,seq_len=16}"
    llmopt.run_pipeline(model, "fold,cleanup,fuse")
    floats = _float_weights(model)
    result = llmopt.run_pipeline(model, f"qdq{opts},cleanup")
    rec = next(r for r in result.records if r.name == "qdq")
    errors = json.loads(model.metadata_props[QUANT_ERROR_KEY])
    assert set(errors) == floats - _float_weights(model) and len(errors) == rec.counters["matmul"]
    limit = 0.02 if "per_channel=false" not in options else 0.05  # per-tensor scales: coarser
    for name, e in errors.items():
        assert 0 < e["rel_rmse"] < limit and (e["pass"], e["bits"], e["method"], e["block_size"]) == ("qdq", 8, "rtn", None), name
    ops = [n.op_type for n in model.graph]
    assert ops.count("QuantizeLinear") == rec.counters["activations"] > 0
    assert ops.count("DequantizeLinear") == rec.counters["activations"] + rec.counters["matmul"]
    after = sessions.run_ir_model(model, feeds)
    for b, a in zip(before, after):
        assert verify.compare(b, a).cosine > 0.98  # tiny random model, random calibration ids


def test_cuda_int8_checks_ops_on_cpu(exported, tmp_path):
    src = exported("llama", True)
    art = llmopt.compile(src, target="cuda-int8", out=tmp_path / "ok", measure_speed=False,
                         passes="fold,cleanup,fuse,kv-cache,qdq{calibration=random,samples=4,seq_len=16},cleanup")
    assert art.report["provider"] == "CUDAExecutionProvider" and art.report["verification"]["passed"]
    # verified with the QDQ graph computed as written, not by the CPU's (VNNI-dependent) integer kernels
    assert art.report["target"]["verify_session_config"] == {"session.disable_quant_qdq": "1"}
    with pytest.raises(VerificationError, match="DynamicQuantizeMatMul"):  # a CPU-only kernel
        llmopt.compile(src, target="cuda-int8", out=tmp_path / "bad", measure_speed=False,
                       passes="fold,cleanup,fuse,quantize-dynamic{kernel=dynamic},cleanup")
    assert not (tmp_path / "bad").exists()

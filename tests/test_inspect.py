import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir

from llmopt.frontend.inspector import inspect_model


def test_inspect_llama(exported):
    info = inspect_model(exported("llama", True))
    assert info["kv_cache"] == {"layers": 2, "kv_heads": 2, "head_dim": 16, "dtype": "float", "bytes_per_token": 2 * 2 * 2 * 16 * 4}
    assert info["parameters"]["by_dtype"]["float"]["bytes"] == 4 * info["parameters"]["by_dtype"]["float"]["count"]
    assert info["ops"]["MatMul"] >= 14 and info["nodes"] == sum(info["ops"].values())
    assert [i["name"] for i in info["io"]["inputs"]][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert info["io"]["outputs"][0]["shape"] == ["batch", "sequence_length", 512]


def test_inspect_no_cache(exported):
    assert inspect_model(exported("gpt2", False))["kv_cache"] is None


def test_inspect_never_reads_weights(tmp_path):
    """A model with 1.5 GB of (sparse) external weights: inspect's peak RSS stays far below that."""
    n = 1536 * 1024 * 1024 // 4
    x = ir.Value(name="x", shape=ir.Shape([1, 1024]), type=ir.TensorType(ir.DataType.FLOAT))
    data = tmp_path / "big.onnx.data"
    with open(data, "wb") as f:
        f.truncate(n * 4)  # sparse: reading it would fault in 1.5 GB
    w = ir.Value(
        name="w",
        const_value=ir.ExternalTensor("big.onnx.data", offset=0, length=n * 4, dtype=ir.DataType.FLOAT,
                                      shape=ir.Shape([1024, n // 1024]), name="w", base_dir=str(tmp_path)),
    )
    mm = ir.node("MatMul", [x, w])
    mm.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[w], opset_imports={"": 20}), ir_version=10)
    ir.save(model, tmp_path / "big.onnx")
    assert data.stat().st_size == n * 4
    code = (
        "import json; from llmopt.frontend.inspector import inspect_model;"
        f"info = inspect_model({str(tmp_path / 'big.onnx')!r});"
        # VmHWM is this process's own peak (ru_maxrss can carry the parent's across exec)
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1];"
        "print(json.dumps([info['parameters']['bytes'], int(hwm)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    nbytes, peak_kib = json.loads(out.stdout)
    assert nbytes == n * 4
    assert peak_kib * 1024 < 0.25 * nbytes, f"peak RSS {peak_kib} KiB"

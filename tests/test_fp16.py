"""fp16 / cuda-fp16: weights, activations and KV cache in float16 with float32 logits; the graph
runs on the CPU provider within the target's budget, and the runtime drives its fp16 cache."""

import numpy as np
import pytest

import llmopt
from llmopt.ort.generation import Generator


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_cuda_fp16_compiles_and_verifies_on_cpu(exported, tmp_path, arch):
    """With the target's defaults (speed measured too); Mixtral's experts as an fp16 MoE node."""
    art = llmopt.compile(exported(arch, True), target="cuda-fp16", out=tmp_path / "a")
    r = art.report
    assert r["provider"] == "CUDAExecutionProvider" and r["verification"]["passed"]
    assert r["verification"]["figures"]["cosine"] > 0.999
    io = {v["name"]: v["dtype"] for v in r["io"]["inputs"] + r["io"]["outputs"]}
    assert io["past_key_values.0.key"] == "float16" and io["present.0.value"] == "float16"
    assert io["logits"] == "float"
    assert r["artifact"]["bytes"] < 0.6 * r["source"]["bytes"]
    model = llmopt.load(art.model_path)
    import onnx_ir as ir

    assert not any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
                   and v.const_value.size > 1 for v in model.graph.initializers.values())
    gen = Generator(art.path)
    assert gen.layout.dtype == np.float16
    assert len(gen.generate([[3, 4, 5, 6]], 4).tokens[0]) == 4
    if arch == "mixtral":
        moe = [n for n in model.graph if n.op_type == "MoE"]
        assert len(moe) == 2 and all(n.inputs[2].const_value.dtype == ir.DataType.FLOAT16 for n in moe)

"""QAT: fake quantization on the weight-only grid, a few steps of fine-tuning, then the ordinary
compile; the fake-quant forward equals the dequantized RTN weights the pass writes."""

import json

import numpy as np
import pytest

import llmopt
from llmopt.frontend import qat
from llmopt.quant.tensor import quantize
from llmopt.quant.spec import QuantSpec



def quantize_blocks(w, spec):
    """Round to nearest on ``spec``'s blocks: ``q, scale, zero`` in MatMulNBits' layout."""
    qt = quantize(w, spec)
    return qt.q, qt.scale, qt.zero

@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False)])
def test_fake_quant_is_the_weight_only_grid(bits, symmetric):
    torch = pytest.importorskip("torch")
    w = np.random.default_rng(0).normal(size=(24, 80)).astype(np.float32)  # [out, in]
    got = qat.fake_quant(torch.from_numpy(w), bits, 32, symmetric).numpy()
    spec = QuantSpec(dtype=f"uint{bits}", symmetric=symmetric, granularity="block", block_size=32)
    q, scale, zero = quantize_blocks(w.T, spec)
    want = ((q - zero[..., None]) * scale[..., None]).reshape(24, -1)[:, :80]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_finetune_then_compile(hf_dirs, tmp_path):
    log = qat.finetune(hf_dirs("llama"), tmp_path / "qat", qat.QATSettings(steps=3, batch=2, seq_len=16,
                                                                           calibration="random", lr=1e-3))
    assert log["linears"] >= 8 and json.loads((tmp_path / "qat" / "qat_log.json").read_text())["settings"]["steps"] == 3
    art = llmopt.compile(tmp_path / "qat", target="cpu-int4", out=tmp_path / "art", measure_speed=False,
                         passes="fold,cleanup,fuse,kv-cache,weight-only{bits=4,block_size=32,method=rtn},cleanup")
    assert art.report["verification"]["passed"]
    with pytest.raises(llmopt.LlmoptError, match="config.json"):
        qat.finetune(tmp_path, tmp_path / "x")

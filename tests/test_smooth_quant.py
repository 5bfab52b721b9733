"""smooth-quant: the float model computes the same function after smoothing, its norm outputs get
flatter across channels, and it composes with qdq."""

import numpy as np

import llmopt
from llmopt.ort import calibration as cal
from llmopt.ort import sessions
from llmopt.ort import verify


def test_smoothing_keeps_the_function_and_flattens_activations(exported):
    model = llmopt.load(exported("llama", True))
    llmopt.run_pipeline(model, "fold,cleanup,fuse,cleanup")
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(True))]
    before = sessions.run_ir_model(model, feeds)
    norms = [n.outputs[0].name for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization"][:1]
    batches = cal.token_batches("random", None, seq_len=16, samples=4, vocab=512)
    spread = lambda m: (lambda a: a.max() / a.mean())(cal.collect(m, norms, batches, lambda _: [cal.ChannelStats()])[norms[0]][0].amax)  # noqa: E731
    spread_before = spread(model)
    result = llmopt.run_pipeline(model, "smooth-quant{alpha=0.5,calibration=random,samples=4,seq_len=16}")
    assert result.records[0].counters["norms"] >= 4 and result.records[0].counters["matmuls"] >= 4
    after = sessions.run_ir_model(model, feeds)
    for b, a in zip(before, after):
        for name in b:
            np.testing.assert_allclose(a[name], b[name], atol=2e-4, rtol=1e-3)
    assert spread(model) < spread_before


def test_smooth_quant_then_qdq_runs(exported):
    model = llmopt.load(exported("qwen2", True))
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(True))]
    before = sessions.run_ir_model(model, feeds)
    opts = "calibration=random,samples=4,seq_len=16"
    llmopt.run_pipeline(model, f"fold,cleanup,fuse,smooth-quant{{{opts}}},qdq{{{opts}}},cleanup")
    # the QDQ graph's own numbers (as cuda-int8 verifies it): x86 integer kernels without VNNI saturate
    after = sessions.run_ir_model(model, feeds, config=sessions.QDQ_AS_WRITTEN)
    for b, a in zip(before, after):
        assert verify.compare(b, a).cosine > 0.98

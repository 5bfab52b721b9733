"""fuse: every architecture's export keeps its numerics (fp32, 1e-4 max-abs) and loses nodes."""

import numpy as np
import pytest

import llmopt
from llmopt import verify
from llmopt.models.architectures import ARCHITECTURES
from llmopt.registry import get_pass

FUSED_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "RotaryEmbedding", "MultiHeadAttention", "GroupQueryAttention", "FastGelu", "Gelu"}


@pytest.mark.parametrize("with_past", [False, True], ids=["no-past", "past"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fuse_keeps_logits(exported, arch, with_past):
    model = llmopt.load(exported(arch, with_past))
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(with_past))]
    before = verify.run_ir_model(model, feeds)
    nodes = len(list(model.graph))
    p = get_pass("fuse")()
    assert p(model).modified
    assert len(list(model.graph)) < nodes
    assert {n.op_type for n in model.graph} & FUSED_OPS
    assert sum(v for k, v in p.counters.items() if "normalization" in k) >= 2 * 2  # two norms per layer
    ops = [n.op_type for n in model.graph]
    layers = 2
    assert sum(ops.count(o) for o in ("GroupQueryAttention", "MultiHeadAttention")) == layers
    assert sum(ops.count(o) for o in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                                      "LayerNormalization", "SkipLayerNormalization")) == 2 * layers + 1
    if with_past and arch != "gpt2":  # rotary folded into GroupQueryAttention (do_rotary=1)
        gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
        assert len(gqa) == layers and all(n.attributes["do_rotary"].as_int() == 1 for n in gqa)
    after = verify.run_ir_model(model, feeds)
    for b, a in zip(before, after):
        for name in b:
            np.testing.assert_allclose(a[name], b[name], atol=1e-4)


def test_gemm_rewritten_for_gpt2(exported):
    model = llmopt.load(exported("gpt2", False))
    p = get_pass("fuse")()
    p(model)
    assert p.counters["gemm_to_matmul"] == 2 * 4
    assert not any(n.op_type == "Gemm" for n in model.graph)

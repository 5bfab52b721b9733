"""`smooth-quant`: move activation outliers into the weights before static quantization
(Xiao et al., 2023, SmoothQuant).

LLM activations have a few input channels with values far larger than the rest; per-tensor
activation scales then waste most of the int8 range on them. For a normalization whose output
feeds only MatMuls with constant weights (the Q/K/V and gate/up projections after ``fuse``),
each channel ``j`` is divided by

    s_j = max|X_j| ** alpha / max_i |W_ji| ** (1 - alpha)

(``max|X_j|`` from calibration text, the weight maximum over every consumer), by folding ``1/s``
into the norm's scale and ``s`` into the rows of every consumer's weight. The float model computes
the same function (checked by the test); its activations are flatter, so ``qdq`` after it loses
less. Run it before ``qdq``: ``smooth-quant{alpha=0.5},qdq``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass
from llmopt.quant.sites import LinearSite, linear_site

NORMS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization", "SkipLayerNormalization"}


@dataclasses.dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = option(0.5, "migration strength: 0 keeps activations, 1 moves all of their range into weights")
    calibration: str = option("builtin", "a text file tokenized with the model's tokenizer, 'builtin', or 'random'")
    samples: int = option(16, "calibration sequences")
    seq_len: int = option(128, "tokens per calibration sequence")

    def __post_init__(self):
        from llmopt.errors import PipelineError

        if not 0 <= self.alpha <= 1:
            raise PipelineError(f"smooth-quant: alpha must be in [0, 1], got {self.alpha}")


def _weight(node: ir.Node) -> ir.Value | None:
    """The constant [K, N] weight of a plain MatMul that only it reads, else None."""
    site = linear_site(node, plain=True, fold_bias=False)
    return site.weight if isinstance(site, LinearSite) else None


@register_pass
class SmoothQuant(Pass):
    name = "smooth-quant"
    summary = "SmoothQuant: divide outlier activation channels by s, multiply the next weights' rows by s."
    Options = SmoothQuantOptions

    def run(self, model: ir.Model) -> bool:
        from llmopt.ort import calibration

        sites = []
        for node in model.graph:
            if node.op_type not in NORMS or node.domain not in ("", "ai.onnx", "com.microsoft"):
                continue
            g = 2 if node.op_type.startswith("Skip") else 1  # Skip*(input, skip, gamma, beta, bias)
            gamma = node.inputs[g] if len(node.inputs) > g else None
            beta = node.inputs[g + 1] if len(node.inputs) > g + 1 else None
            if gamma is None or gamma.const_value is None or beta is not None:
                continue  # a shift (beta) would need the same division: not handled
            out = node.outputs[0]
            users = [u for u, _ in out.uses()]
            if not users or out.is_graph_output() or any(_weight(u) is None or u.inputs[0] is not out for u in users):
                continue
            sites.append((node, g, users))
        if not sites:
            return False
        obs, _ = calibration.observe(model, [n.outputs[0].name for n, _, _ in sites], self.options, calibration.ChannelStats)
        a = self.options.alpha
        for node, g, users in sites:
            x_max = np.maximum(obs[node.outputs[0].name].amax, 1e-5)
            weights = [_weight(u) for u in users]
            w_max = np.maximum(np.max([np.abs(w.const_value.numpy()).max(axis=1) for w in weights], axis=0), 1e-5)
            s = (x_max ** a / w_max ** (1 - a)).astype(np.float32)
            gamma = node.inputs[g]
            new_gamma = (gamma.const_value.numpy().astype(np.float32) / s).astype(gamma.const_value.numpy().dtype)
            node.replace_input_with(g, graph_util.add_initializer(model.graph, f"{gamma.name}_smoothed", new_gamma))
            for user, w in zip(users, weights):
                scaled = (w.const_value.numpy().astype(np.float32) * s[:, None]).astype(w.const_value.numpy().dtype)
                user.replace_input_with(1, graph_util.add_initializer(model.graph, f"{w.name}_smoothed", scaled))
            self.count("norms")
            self.count("matmuls", len(users))
        graph_util.drop_unused_initializers(model.graph)
        return True

"""`prune-ffn`: remove whole intermediate channels of gated MLPs, so the model is smaller.

In ``down(act(gate(x)) · up(x))`` the ``ratio`` lowest-scoring channels go: columns of ``gate`` and
``up``, rows of ``down``. Channel score: magnitude ``‖gate_j‖·‖up_j‖·‖down_j‖``, wanda
``‖down_j‖ · ‖h_j‖₂`` with ``h`` the MLP's hidden activation over calibration text. An MLP is left
whole when any of its three MatMuls or weights matches ``exclude``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass
from llmopt.errors import PipelineError
from llmopt.passes.prune import PruneError, ScoredOptions, activation_norms
from llmopt.quant.sites import excluded


@dataclasses.dataclass(frozen=True)
class StructuredOptions(ScoredOptions):
    ratio: float = option(0.25, "fraction of channels (prune-ffn) or KV heads (prune-heads) removed")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.ratio < 1:
            raise PipelineError(f"prune: ratio must be in [0, 1), got {self.ratio}")


@register_pass
class PruneFFN(Pass):
    name = "prune-ffn"
    summary = "Remove the least important gated-MLP channels (gate/up columns, down rows): a smaller model."
    Options = StructuredOptions

    def run(self, model: ir.Model) -> bool:
        mlps = _gated_mlps(model)
        if not mlps:
            raise PruneError("prune-ffn: no gated MLP (down(act(gate(x)) * up(x)) with constant "
                             "weights) found; run 'fuse' first, or the architecture's FFN is not supported")
        kept = [m for m in mlps if not excluded(self.options.exclude, *(n for k in ("gate", "up", "down")
                                                          for n in (m[k].name, m[k].inputs[1].name)))]
        self.count("excluded", len(mlps) - len(kept))
        mlps = kept
        if not mlps:
            return False
        hidden_norms = {}
        if self.options.method == "wanda":
            hidden_norms = activation_norms(model, [m["down"].inputs[0].name for m in mlps], self.options)
        for m in mlps:
            g, u, d = (m[k].inputs[1].const_value.numpy().astype(np.float32) for k in ("gate", "up", "down"))
            width = g.shape[1]
            if self.options.method == "wanda":
                score = hidden_norms[m["down"].inputs[0].name] * np.linalg.norm(d, axis=1)
            else:
                score = np.linalg.norm(g, axis=0) * np.linalg.norm(u, axis=0) * np.linalg.norm(d, axis=1)
            drop = int(round(self.options.ratio * width))
            keep = np.sort(np.argsort(score)[drop:])
            for key, arr, axis in (("gate", g, 1), ("up", u, 1), ("down", d, 0)):
                node = m[key]
                old = node.inputs[1]
                sliced = np.take(arr, keep, axis=axis).astype(old.const_value.numpy().dtype)
                node.replace_input_with(1, graph_util.add_initializer(model.graph, f"{old.name}_ffn{len(keep)}", sliced))
            for v in m["hidden_values"]:  # the shapes downstream of gate/up now end in len(keep)
                if v.shape is not None and v.shape[-1] == width:
                    v.shape = ir.Shape([*list(v.shape)[:-1], len(keep)])
            self.count("mlps")
            self.count("channels_removed", width - len(keep))
        graph_util.drop_unused_initializers(model.graph)
        return True


def _gated_mlps(model: ir.Model) -> list[dict]:
    """``down(Mul(act(gate(x)), up(x)))`` with act = x·Sigmoid(x) (SiLU), QuickGelu, Gelu or FastGelu."""
    found = []
    for down in model.graph:
        if down.op_type != "MatMul" or down.inputs[1] is None or down.inputs[1].const_value is None:
            continue
        mul = down.inputs[0].producer()
        if mul is None or mul.op_type != "Mul" or len(down.inputs[0].uses()) != 1:
            continue
        for a_idx in (0, 1):
            act_out, up_out = mul.inputs[a_idx], mul.inputs[1 - a_idx]
            up = up_out.producer()
            act = act_out.producer()
            if up is None or act is None or up.op_type != "MatMul" or up.inputs[1].const_value is None:
                continue
            if act.op_type in ("QuickGelu", "Gelu", "FastGelu") and len(act.inputs) == 1:
                gate_out, extra = act.inputs[0], [act_out]
            elif act.op_type == "Mul":  # SiLU: g * Sigmoid(g)
                sig = next((i.producer() for i in act.inputs if i.producer() is not None and i.producer().op_type == "Sigmoid"), None)
                if sig is None:
                    continue
                gate_out, extra = sig.inputs[0], [act_out, sig.outputs[0]]
                if gate_out not in act.inputs:
                    continue
            else:
                continue
            gate = gate_out.producer()
            if gate is None or gate.op_type != "MatMul" or gate.inputs[1].const_value is None or gate.inputs[0] is not up.inputs[0]:
                continue
            if any(len(n.inputs[1].uses()) != 1 for n in (gate, up, down)):
                continue
            found.append({"gate": gate, "up": up, "down": down,
                          "hidden_values": [gate_out, up_out, down.inputs[0], *extra]})
            break
    return found

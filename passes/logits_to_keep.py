"""`logits-to-keep`: compute the lm_head only for the positions a caller keeps.

A decoder computes logits for every position of its input, but generation reads one: the last.
For a 64-token prompt, 63 rows of the lm_head's product are thrown away — a quarter of the prefill
work of a 50M-parameter model whose lm_head is a quarter of its weights (llama.cpp computes only
the rows it outputs). The pass adds the graph input ``logits_to_keep`` (int64 scalar, named and
meant as transformers' ``logits_to_keep`` argument) and slices the lm_head's input to the last
``logits_to_keep`` positions: ``Slice(x, -k, ∞, axis=1)``. Its default — an initializer of the
same name, so a caller may leave it out — is 0, and ``-0 = 0`` keeps every position, so the graph
is unchanged for whoever does not feed it (verification, ``llmopt eval``, onnxruntime-genai).
``llmopt generate``/``bench`` feed the number of positions their prompts need.

The lm_head is the MatMul (or FusedMatMul / Gemm) whose output reaches ``logits`` through
element-wise ops only (a bias Add, softcapping's Div/Tanh/Mul, a Cast), with a constant weight and
a rank-3 input. A graph where no such node is found is left alone, with a warning.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.core.pass_base import Pass
from llmopt.core.registry import register_pass

INPUT = "logits_to_keep"


@dataclasses.dataclass(frozen=True)
class LogitsToKeepOptions:
    pass


@register_pass
class LogitsToKeep(Pass):
    name = "logits-to-keep"
    summary = "Add the logits_to_keep input (default 0: all positions); the lm_head runs on the last k positions only."
    Options = LogitsToKeepOptions

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        if INPUT in {v.name for v in graph.inputs} or "input_ids" not in {v.name for v in graph.inputs}:
            return False
        head = graph_util.lm_head(graph)
        if head is None:
            self.warn("no lm_head found (a linear layer with a rank-3 input feeding 'logits' through element-wise ops); "
                      "logits are computed for every position")
            return False
        k = ir.Value(name=INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
        k.const_value = ir.tensor(np.array(0, dtype=np.int64), name=INPUT)
        graph.inputs.append(k)
        graph.register_initializer(k)
        x = head.inputs[0]
        neg = ir.node("Neg", [k], name="logits_to_keep_neg")
        axes = graph_util.add_initializer(graph, "logits_to_keep_axes", np.array([0], dtype=np.int64))
        start = ir.node("Unsqueeze", [neg.outputs[0], axes], name="logits_to_keep_start")
        end = graph_util.add_initializer(graph, "logits_to_keep_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        seq_axis = graph_util.add_initializer(graph, "logits_to_keep_axis", np.array([1], dtype=np.int64))
        sl = ir.node("Slice", [x, start.outputs[0], end, seq_axis], name="logits_to_keep_slice")
        sl.outputs[0].name = "logits_to_keep_hidden"
        sl.outputs[0].type = x.type
        sl.outputs[0].shape = ir.Shape([x.shape[0], "kept_positions", x.shape[2]])
        graph.insert_before(head, [neg, start, sl])
        head.replace_input_with(0, sl.outputs[0])
        logits = next(v for v in graph.outputs if v.name == "logits")
        if logits.shape is not None and len(logits.shape) == 3:
            logits.shape = ir.Shape([logits.shape[0], "kept_positions", logits.shape[2]])
        self.count("lm_head_sliced")
        return True

"""`fp16`: the graph in float16 — weights, activations, the KV cache — with fp32 logits.

Every float32 initializer becomes float16 (converted lazily, one tensor at a time, when the model
is written), every float32 value and constant in the graph becomes float16, ``Cast(to=float)``
becomes ``Cast(to=float16)``, and float graph inputs (the KV cache) become float16. The logits are
cast back to float32 at the very end, where precision matters for sampling and perplexity, and so
callers keep one output type. Norms and attention run as their fused kernels, which accumulate in
float32 internally on the CUDA provider.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


@dataclasses.dataclass(frozen=True)
class Fp16Options:
    logits_fp32: bool = option(True, "cast the logits back to float32")


def _half(tensor) -> ir.TensorProtocol:
    return ir.LazyTensor(lambda: ir.tensor(tensor.numpy().astype(np.float16)), dtype=F16, shape=tensor.shape,
                         name=tensor.name)


@register_pass
class Fp16(Pass):
    name = "fp16"
    summary = "Convert weights, activations and the KV cache to float16 (logits stay float32)."
    Options = Fp16Options

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        changed = False
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype == F32:
                value.const_value = _half(value.const_value)
                value.type = ir.TensorType(F16)
                self.count("initializers")
        for value in graph.inputs:
            if value.dtype == F32:
                value.type = ir.TensorType(F16)
                self.count("inputs")
        for node in graph:
            for key, attr in list(node.attributes.items()):
                if node.op_type == "Cast" and key == "to" and attr.as_int() == F32:
                    node.attributes["to"] = ir.AttrInt64("to", int(F16))
                    self.count("casts")
                elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == F32:
                    node.attributes[key] = ir.AttrTensor(key, ir.tensor(attr.value.numpy().astype(np.float16)))
                    self.count("constants")
            for out in node.outputs:
                if out.dtype == F32:
                    out.type = ir.TensorType(F16)
                    changed = True
        if self.options.logits_fp32:
            for i, out in enumerate(list(graph.outputs)):
                if out.name == "logits" and out.dtype == F16:
                    cast = ir.node("Cast", [out], attributes={"to": F32}, name="logits_to_fp32")
                    graph.append(cast)
                    name, shape = out.name, out.shape
                    out.name = "logits_fp16"
                    cast.outputs[0].name, cast.outputs[0].shape = name, shape
                    cast.outputs[0].type = ir.TensorType(F32)
                    graph.outputs[i] = cast.outputs[0]
                    self.count("logits_cast")
        return changed or bool(self.counters)

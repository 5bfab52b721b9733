"""`fuse`: operator fusion for transformer graphs.

This first version runs onnxscript's ORT fusion rules (``onnxscript.rewriter.ort_fusions``,
reused as is): RMSNorm / LayerNorm and their skip (residual) forms, GELU variants, rotary
embeddings and their cos/sin caches, scaled-dot-product attention → ``MultiHeadAttention`` /
``GroupQueryAttention`` where their patterns match. llmopt's own rules — which close the gaps
that set leaves on today's exports (see issue 3) — are added here as they land, each with its
counter.

Counters are the number of matches per rule; ``modified`` compares the graph's node structure
before and after, so it is exact even when no rule fires but the preparatory optimizations
changed something.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from llmopt.pass_base import Pass, option
from llmopt.registry import register_pass


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    clear_metadata: bool = option(False, "drop node metadata and doc strings (exporter stack traces)")


def _structure(model: ir.Model) -> tuple:
    return tuple(
        (n.domain, n.op_type, tuple(id(v) for v in n.inputs), tuple(id(v) for v in n.outputs))
        for n in model.graph
    )


def _gemm_to_matmul(model: ir.Model) -> int:
    """Gemm(A, B, C) → MatMul(A, B') + C, so the rules (and later the rank of A) are free.

    onnxscript's own Gemm rewrite only covers some forms, and its shape optimizations can then
    drop the 2-D Reshape around a Gemm that GPT-2's export has, which ONNX Runtime refuses.
    """
    graph = model.graph
    n = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {k: v.value for k, v in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        a, b = node.inputs[0], node.inputs[1]
        new_nodes = []
        if attrs.get("transB", 0):
            t = ir.node("Transpose", [b], attributes={"perm": [1, 0]}, name=f"{node.name}_transB")
            new_nodes.append(t)
            b = t.outputs[0]
        mm = ir.node("MatMul", [a, b], name=f"{node.name}_matmul")
        new_nodes.append(mm)
        result = mm.outputs[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.node("Add", [result, node.inputs[2]], name=f"{node.name}_bias")
            new_nodes.append(add)
            result = add.outputs[0]
        old = node.outputs[0]
        result.shape, result.type = old.shape, old.type
        graph.insert_before(node, new_nodes)
        was_output, name = old.is_graph_output(), old.name
        ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
        if was_output:
            old.name, result.name = None, name
        graph.remove(node, safe=True)
        n += 1
    return n


@register_pass
class Fuse(Pass):
    name = "fuse"
    summary = "Fuse norms, GELU, rotary embeddings and attention into ONNX Runtime contrib ops."
    Options = FuseOptions

    def run(self, model: ir.Model) -> bool:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        before = _structure(model)
        gemms = _gemm_to_matmul(model)
        if gemms:
            self.count("gemm_to_matmul", gemms)
        result, counts = optimize_for_ort(model, clear_metadata=self.options.clear_metadata)
        if result is not model:  # the pass contract is in place; onnxscript keeps the object today
            raise RuntimeError("onnxscript's optimize_for_ort returned a new model object")
        for rule, n in counts.items():
            if n:
                self.count(rule, n)
        return _structure(model) != before

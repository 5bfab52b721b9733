"""llmopt's own rules for the `fuse` pass: linear layers in the form the fusions expect.

- ``gemm_to_matmul``: ``Gemm`` → ``MatMul`` + ``Add``.
- ``FlattenedLinear`` (``flattened_linear``, ``flattened_linear_after_mha``): GPT-2's 2-D
  Reshape → MatMul (+ bias) → Reshape back → one MatMul over the 3-D input.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from llmopt.core import graph_util
from llmopt.passes.fuse_common import MS, const_ints, same_dim


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def gemm_to_matmul(model: ir.Model) -> int:
    """Gemm(A, B, C) → MatMul(A, B') + C, so the rules (and later the rank of A) are free.

    onnxscript's own Gemm rewrite only covers some forms, and its shape optimizations can then
    drop the 2-D Reshape around a Gemm that GPT-2's export has, which ONNX Runtime refuses.
    """
    graph = model.graph
    n = 0
    for node in list(graph):
        if node.op_type != "Gemm" or not _is_default_domain(node):
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
        graph_util.replace_value(old, result)
        graph.remove(node, safe=True)
        n += 1
    return n


class FlattenedLinear(pattern.RewriteRuleClassBase):
    """``Reshape(MatMul(Reshape(x, [-1, K]), W) [+ b], [B, S, N])`` → ``MatMul(x, W) [+ b]``.

    GPT-2's export flattens every linear layer to 2-D and back (its ``Conv1D`` is ``addmm``).
    MatMul broadcasts over the leading dims, so the pair of Reshapes is a no-op when the output
    shape is the input's leading dims plus N. ``source='mha'``: the input is a
    ``MultiHeadAttention`` output (already ``[B, S, D]``; the fusion left a 2-D annotation on it).
    """

    def __init__(self, has_bias: bool, source: str):
        super().__init__(f"FlattenedLinear{'_bias' if has_bias else ''}_{source}")
        self.has_bias, self.source = has_bias, source

    def pattern(self, op, x, flat, w, b, shape):
        inp = op.Reshape(x, flat) if self.source == "reshape" else x
        y = op.MatMul(inp, w)
        if self.has_bias:
            y = op.Add(y, b)
        return op.Reshape(y, shape, _outputs=["out"])

    def check(self, context, x, w, out, flat=None, b=None, **_):
        result = pattern.MatchResult()
        if w.const_value is None or len(w.const_value.shape) != 2:
            return result.fail("weight is not a constant 2-D tensor", w)
        k, n = w.const_value.shape
        if self.has_bias and (b.const_value is None or tuple(b.const_value.shape) != (n,)):
            return result.fail("bias is not a constant vector of the output size", b)
        if self.source == "reshape":
            lead = x.shape
            if lead is None or len(lead) != 3 or not same_dim(lead[2], k):
                return result.fail("input is not [B, S, K]", x)
            if const_ints(flat) != [-1, k]:
                return result.fail(f"inner Reshape is to {const_ints(flat)}, not [-1, {k}]", flat)
        else:
            producer = x.producer()
            if producer is None or producer.op_type != "MultiHeadAttention" or producer.domain != MS:
                return result.fail("input is not a MultiHeadAttention output", x)
            lead = producer.inputs[0].shape
            if lead is None or len(lead) != 3:
                return result.fail("attention query is not [B, S, D]", producer.inputs[0])
        if out.shape is None or len(out.shape) != 3 or not all(same_dim(a, c) for a, c in zip(out.shape[:2], lead[:2])) \
                or not same_dim(out.shape[2], n):
            return result.fail(f"outer Reshape gives {out.shape}, not the input's leading dims plus {n}", out)
        return result

    def rewrite(self, op, x, w, b=None, **_):
        y = op.MatMul(x, w)
        return op.Add(y, b) if self.has_bias else y

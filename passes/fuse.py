"""`fuse`: operator fusion for transformer graphs.

Runs onnxscript's ORT fusion rules (``onnxscript.rewriter.ort_fusions``, reused as is):
RMSNorm / LayerNorm and their skip (residual) forms, GELU variants, rotary embeddings and
their cos/sin caches, scaled-dot-product attention → ``MultiHeadAttention`` /
``GroupQueryAttention`` where their patterns match. Before them, llmopt's own rules put
today's exports in the form those patterns expect:

- ``gemm_to_matmul`` (ours): ``Gemm`` → ``MatMul`` + ``Add`` (GPT-2's export otherwise ends up
  with a rank-3 Gemm that ONNX Runtime refuses);
- ``rotary_angles`` (ours, an onnxscript pattern rule): transformers ≥ 5 computes the rotary
  angles as ``Mul(Cast(Unsqueeze(position_ids, -1)), inv_freq)``; onnxscript's cos/sin-cache rule
  expects ``Transpose(MatMul(inv_freq[1,E,1], position_ids[B,1,S]))``. Rewriting the one into the
  other (bit-identical: a product with a contraction of length 1) is what lets the rotary and
  then the GroupQueryAttention fusions fire: 13 nodes per Llama layer instead of onnxscript's 49
  alone (docs/benchmarks.md, "Fusion coverage").

Known limit of the fused attention (ORT's ``GroupQueryAttention``): sequence lengths come from
the sum of ``attention_mask`` (right padding), and a step with several new tokens *and* past
context must have batch 1 — which is how generation loops run prefill and decode.

Counters are the number of matches per rule; ``modified`` compares the graph's node structure
before and after, so it is exact even when no rule fires but the preparatory optimizations
changed something.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from llmopt import ir as irx
from llmopt.pass_base import Pass, option
from llmopt.registry import register_pass


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    clear_metadata: bool = option(False, "drop node metadata and doc strings (exporter stack traces)")


def _structure(model: ir.Model) -> tuple:
    """The graph's node structure: ops, attributes and wiring (value identity and name)."""

    def key(v):
        return None if v is None else (id(v), v.name)

    def attr(a):  # scalars and lists by value; tensors and graphs by identity (never printed)
        return str(a.value) if isinstance(a.value, (int, float, str, list, tuple)) else id(a.value)

    return tuple(
        (n.domain, n.op_type, tuple(sorted((k, attr(a)) for k, a in n.attributes.items())),
         tuple(map(key, n.inputs)), tuple(map(key, n.outputs)))
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
        irx.replace_value(old, result)
        graph.remove(node, safe=True)
        n += 1
    return n


class RotaryAnglesAsMatMul(pattern.RewriteRuleClassBase):
    """``Mul(Cast(Unsqueeze(pos, [-1])), inv_freq[E])`` → ``Transpose(MatMul(inv_freq[1,E,1], Cast(Unsqueeze(pos, [1]))), [0,2,1])``."""

    def pattern(self, op, position_ids, axes, inv_freq):
        return op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)

    def check(self, context, position_ids, axes, inv_freq, **_):
        result = pattern.MatchResult()
        if inv_freq.const_value is None or len(inv_freq.const_value.shape) != 1:
            return result.fail("inv_freq is not a constant 1-D tensor", inv_freq)
        if position_ids.shape is None or len(position_ids.shape) != 2:
            return result.fail("position_ids is not 2-D", position_ids)
        if axes.const_value is None or [int(a) for a in axes.const_value.numpy().reshape(-1)] not in ([-1], [2]):
            return result.fail("Unsqueeze does not append the last axis", axes)
        return result

    def rewrite(self, op, position_ids, axes, inv_freq):
        inv = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1, 1)
        pos = op.Cast(op.Unsqueeze(position_ids, op.Constant(value_ints=[1])), to=ir.DataType.FLOAT)
        return op.Transpose(op.MatMul(op.Constant(value=ir.tensor(inv)), pos), perm=[0, 2, 1])


class IdentityReshape(pattern.RewriteRuleClassBase):
    """``Reshape(x, shape)`` whose output has the same (symbolic) shape as ``x`` → ``x``.

    Phi-3's export reshapes the attention output to the shape it already has, which hides the
    SDPA → Transpose → Reshape chain the attention fusions look for.
    """

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _outputs=["y"])

    def check(self, context, x, y, **_):
        result = pattern.MatchResult()
        if x.shape is None or y.shape is None or len(x.shape) != len(y.shape):
            return result.fail("shapes unknown or of different rank", [x, y])
        for a, b in zip(x.shape, y.shape):
            if not (isinstance(a, int) and a == b) and not (
                isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim) and a.value is not None and a.value == b.value
            ):
                return result.fail(f"dims {a} and {b} are not provably equal", [x, y])
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


# Our canonicalization rules, by counter name, applied in order before onnxscript's fusions.
_CANONICALIZE = {
    "rotary_angles": pattern.RewriteRuleSet([RotaryAnglesAsMatMul.rule()]),
    "identity_reshape": pattern.RewriteRuleSet([IdentityReshape.rule()]),
}


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
        for rule_name, rules in _CANONICALIZE.items():
            matched = rules.apply_to_model(model)
            if matched:
                self.count(rule_name, matched)
        result, counts = optimize_for_ort(model, clear_metadata=self.options.clear_metadata)
        if result is not model:  # the pass contract is in place; onnxscript keeps the object today
            raise RuntimeError("onnxscript's optimize_for_ort returned a new model object")
        for rule, n in counts.items():
            if n:
                self.count(rule, n)
        return _structure(model) != before

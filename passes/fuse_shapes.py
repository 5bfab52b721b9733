"""llmopt's own rules for the `fuse` pass: shapes spelled so that the fusions' shape checks see what is equal.

- ``IdentityReshape`` (``identity_reshape``): a Reshape to the shape its input already has.
- ``canonical_dims``: symbolic dims written as sums (``past + seq`` / ``seq + past``) in one order,
  so shape checks that compare dims by name see that they are equal.
"""

from __future__ import annotations

import re

import onnx_ir as ir
from onnxscript.rewriter import pattern


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


_TERM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^\d+$")


def canonical_dim(name: str) -> str:
    """``'seq + past'`` → ``'past + seq'``: the terms of a plain sum in sorted order; others unchanged."""
    terms = [t.strip() for t in name.split("+")]
    if len(terms) < 2 or not all(_TERM.match(t) for t in terms):
        return name
    return " + ".join(sorted(terms))


def canonical_dims(model: ir.Model) -> int:
    """Rewrite every symbolic dim that is a sum into its canonical spelling; returns dims changed."""
    changed = 0
    values = list(model.graph.inputs) + [v for node in model.graph for v in node.outputs]
    for value in values:
        shape = value.shape
        if shape is None:
            continue
        dims = list(shape)
        new = [ir.SymbolicDim(canonical_dim(d.value)) if isinstance(d, ir.SymbolicDim) and d.value else d for d in dims]
        if any(isinstance(a, ir.SymbolicDim) and a.value != b.value for a, b in zip(dims, new)):
            value.shape = ir.Shape(new)
            changed += 1
    return changed

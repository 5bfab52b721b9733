"""llmopt's own rules for the `fuse` pass: activations.

- ``GeluTanhHalfFirst`` (``gelu_half_first``): torch's tanh-GELU export → ``FastGelu``;
  ``FastGeluBias`` (``fast_gelu_bias``): the preceding bias Add into ``FastGelu``'s bias input.
- ``SiluAsQuickGelu`` (``silu``): ``x * Sigmoid(x)`` → ``QuickGelu(x, alpha=1)``, one kernel.
"""

from __future__ import annotations

import numpy as np
from onnxscript.rewriter import pattern

from llmopt.passes.fuse_common import MS, same_dim


class SiluAsQuickGelu(pattern.RewriteRuleClassBase):
    """``Mul(x, Sigmoid(x))`` → ``QuickGelu(x, alpha=1.0)`` (com.microsoft): SiLU in one kernel."""

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def rewrite(self, op, x):
        return op.QuickGelu(x, alpha=1.0, _domain=MS)


class GeluTanhHalfFirst(pattern.RewriteRuleClassBase):
    """``(0.5·x) · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`` → ``FastGelu(x)``.

    onnxscript's tanh-GELU rule expects ``x · (0.5 · (1 + tanh(…)))``; torch's export of
    ``gelu(approximate='tanh')`` (GPT-2's ``gelu_new``) multiplies by 0.5 first.
    """

    def pattern(self, op, x, half, three, c1, c2, one):
        inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), c1)), c2)
        return op.Mul(op.Mul(x, half), op.Add(op.Tanh(inner), one))

    def check(self, context, half, three, c1, c2, one, **_):
        result = pattern.MatchResult()
        want = {"half": (half, 0.5), "three": (three, 3.0), "c1": (c1, 0.044715), "c2": (c2, (2 / np.pi) ** 0.5), "one": (one, 1.0)}
        for name, (v, expected) in want.items():
            if v.const_value is None or v.const_value.size != 1:
                return result.fail(f"{name} is not a constant scalar", v)
            if not np.isclose(float(v.const_value.numpy().reshape(-1)[0]), expected, rtol=1e-5):
                return result.fail(f"{name} is {float(v.const_value.numpy().reshape(-1)[0])}, not {expected}", v)
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain=MS)


class FastGeluBias(pattern.RewriteRuleClassBase):
    """``FastGelu(Add(x, b))`` with a constant vector ``b`` → ``FastGelu(x, b)`` (the kernel adds the bias)."""

    def pattern(self, op, x, b):
        return op.FastGelu(op.Add(x, b), _domain=MS)

    def check(self, context, x, b, **_):
        result = pattern.MatchResult()
        if b.const_value is None or len(b.const_value.shape) != 1:
            return result.fail("bias is not a constant vector", b)
        if x.shape is None or not same_dim(x.shape[-1], b.const_value.shape[0]):
            return result.fail("bias length differs from the last dim", [x, b])
        return result

    def rewrite(self, op, x, b):
        return op.FastGelu(x, b, _domain=MS)

"""A pattern-rule pass: the rule says what it matches, when, and into what; nothing else.

torch's export guards attention softmax against all-masked rows with Where(IsNaN(p), 0, p).
A causal mask never masks a whole row, so the guard is dead weight in every attention block.
"""

from llmopt.core.rules import RewriteRulePass, Rule, fail


class DropNanGuard(Rule):
    """Where(IsNaN(p), 0, p) -> p, for p a Softmax output."""

    def pattern(self, op, p, zero):
        return op.Where(op.IsNaN(p), zero, p)

    def check(self, context, p, zero, **_):
        if p.producer() is None or p.producer().op_type != "Softmax":
            return fail("the guarded value is not a Softmax output")
        value = zero.const_value
        if value is None or value.numpy().size != 1 or float(value.numpy().reshape(())) != 0.0:
            return fail("the replacement is not the constant 0")
        return True

    def rewrite(self, op, p, **_):
        return op.Identity(p)  # the `cleanup` pass removes the Identity


class DropNanGuardPass(RewriteRulePass):
    name = "drop-nan-guard"
    summary = "Remove Where(IsNaN(p), 0, p) after attention softmax (example plugin, pattern rule)"
    rules = (DropNanGuard,)

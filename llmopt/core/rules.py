"""Pattern-rule passes: the same rule base as the built-in fusions (the onnxscript rewriter's
public API), for users' own rewrites.

A rule says what it matches, whether a match may be rewritten, and into what::

    from llmopt.core.rules import Rule, rule_pass, fail

    @rule_pass("square-to-mul", summary="Pow(x, 2) -> Mul(x, x)")
    class SquareToMul(Rule):
        def pattern(self, op, x, two):
            return op.Pow(x, two)

        def check(self, context, x, two, **_):
            value = two.const_value
            if value is None or value.numpy().size != 1 or float(value.numpy().reshape(())) != 2.0:
                return fail("exponent is not the constant 2")
            return True

        def rewrite(self, op, x, **_):
            return op.Mul(x, x)

``rule_pass`` registers a pass named ``square-to-mul`` that applies the rule everywhere, counts
its rewrites, and with ``--explain square-to-mul`` says for a rule that never fired its best
partial match and the check that failed. Several rules make one pass with ``RewriteRulePass``::

    @register_pass
    class MyFusions(RewriteRulePass):
        name = "my-fusions"
        summary = "..."
        rules = (SquareToMul, SomeOtherRule)
"""

from __future__ import annotations

from typing import Any, ClassVar

import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchResult, MatchStatus, RewriteRuleClassBase, RewriteRuleSet

from llmopt.core.pass_base import Pass

__all__ = ["Rule", "RewriteRulePass", "rule_pass", "fail", "explain_rules"]

Rule = RewriteRuleClassBase  # users subclass it and write pattern / check / rewrite


def fail(reason: str) -> MatchResult:
    """What ``check`` returns to refuse a match; ``--explain`` shows ``reason``."""
    return MatchResult().fail(reason)


class RewriteRulePass(Pass):
    """A pass that applies ``rules`` (Rule subclasses or built rules) until none matches.

    Counters: one per rule (its class name, or the rule's ``name``), the number of rewrites.
    ``modified`` is true exactly when some rule rewrote something.
    """

    rules: ClassVar[tuple[Any, ...]] = ()
    commute: ClassVar[bool] = False  # also try commuted inputs of commutative ops (Add, Mul, ...)

    def run(self, model: ir.Model) -> bool:
        built = [_build(r) for r in self.rules]
        if not built:
            raise TypeError(f"pass '{self.name}' has no rules; set the class attribute `rules`")
        total = 0
        for rule in built:  # one rule at a time, so each has its own counter
            n = RewriteRuleSet([rule], commute=self.commute).apply_to_model(model)
            if n:
                self.count(_rule_name(rule), n)
                total += n
            elif self.explain:
                for entry in explain_rules(model, RewriteRuleSet([rule], commute=self.commute)):
                    self.explain_why(**entry)
        return total > 0


def rule_pass(name: str, summary: str = "", *, commute: bool = False, register: bool = True):
    """Class decorator on a ``Rule``: make (and by default register) a pass applying it alone.

    Returns the rule class unchanged; the pass class is its ``llmopt_pass`` attribute.
    """

    def wrap(rule_cls):
        doc = (rule_cls.__doc__ or "").strip().splitlines()
        cls = type(
            f"{rule_cls.__name__}Pass",
            (RewriteRulePass,),
            {"name": name, "summary": summary or (doc[0] if doc else f"applies {rule_cls.__name__}"),
             "rules": (rule_cls,), "commute": commute, "__module__": rule_cls.__module__},
        )
        if register:
            from llmopt.core.registry import register_pass

            register_pass(cls)
        rule_cls.llmopt_pass = cls
        return rule_cls

    return wrap


def _build(rule: Any):
    if isinstance(rule, type) and issubclass(rule, RewriteRuleClassBase):
        return rule.rule()
    return rule  # already a RewriteRule


def _rule_name(rule) -> str:
    return getattr(rule, "name", None) or type(rule).__name__


def explain_rules(model: ir.Model, rules: RewriteRuleSet) -> list[dict]:
    """For each rule of a set, its best partial match on ``model`` (nothing is rewritten)."""
    tracer = MatchingTracer()
    rules.apply_to_model(model, tracer=tracer)
    out = []
    for i, rule in enumerate(rules.rules):
        name = rule.name or f"{type(rule).__name__}#{i}"
        best = tracer.best_matches_map.get(rule) or []
        if not best:
            out.append({"rule": name, "status": "no partial match", "reason": "no node matched the pattern's root"})
            continue
        info = best[0]
        failed_at = list(info.match_result.failure_nodes_and_values)[:3]
        where = [getattr(x, "name", None) for x in failed_at]
        reason = info.match_result.reason or ("matched" if info.status == MatchStatus.SUCCESS else "no reason given")
        found = [f"{x.op_type} '{x.name}'" for x in failed_at if isinstance(x, ir.Node)]
        if found and "alternatives" in reason:  # onnxscript's OrValue says no more: name what was there
            reason = f"{reason.rstrip('.')} (found {', '.join(found)})"
        out.append({
            "rule": name,
            "status": info.status.name.lower().replace("_", " "),
            "reason": reason,
            "at": info.root_node.name,
            "matched_nodes": len(info.match_result.nodes),
            "near": [w for w in where if w],
        })
    return out

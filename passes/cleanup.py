"""`cleanup`: dead code, identities, common subexpressions, unused initializers and
opsets, shape inference, topological order.

Each step is an onnx_ir common pass; ours is the sequence, the options and the
counters. Shape inference goes through onnx_ir's wrapper, which strips
initializer data first, so it works on models of any size.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes import common

from llmopt.core import graph_util
from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass


@dataclasses.dataclass(frozen=True)
class CleanupOptions:
    cse: bool = option(True, "merge common subexpressions")
    shape_inference: bool = option(True, "annotate value shapes and types with ONNX shape inference")
    dedupe_initializers: bool = option(False, "merge identical initializers (reads every weight once)")


@register_pass
class Cleanup(Pass):
    name = "cleanup"
    summary = "Remove dead code and unused initializers/opsets, merge common subexpressions, infer shapes, sort."
    Options = CleanupOptions

    def run(self, model: ir.Model) -> bool:
        o = self.options
        steps: list[tuple[str, ir.passes.PassBase]] = [("identity", common.IdentityEliminationPass())]
        if o.cse:
            steps.append(("cse", common.CommonSubexpressionEliminationPass()))
        if o.dedupe_initializers:
            steps.append(("dedupe", common.DeduplicateInitializersPass()))
        steps += [
            ("dead_code", common.RemoveUnusedNodesPass()),
            ("unused_functions", common.RemoveUnusedFunctionsPass()),
            ("unused_opsets", common.RemoveUnusedOpsetsPass()),
        ]
        if o.shape_inference:
            steps.append(("shape_inference", common.ShapeInferencePass()))
        nodes0 = graph_util.node_count(model)
        inits0 = len(model.graph.initializers)
        modified = False
        for key, step in steps:
            before = graph_util.node_count(model)
            changed = step(model).modified
            modified |= changed
            if key != "shape_inference":
                removed = before - graph_util.node_count(model)
                if removed:
                    self.count(f"nodes_removed.{key}", removed)
            elif changed:
                self.count("shape_inference.updated")
        if common.TopologicalSortPass()(model).modified:
            modified = True
            self.count("reordered")
        self.count("nodes_removed", nodes0 - graph_util.node_count(model))
        self.count("initializers_removed", inits0 - len(model.graph.initializers))
        return modified

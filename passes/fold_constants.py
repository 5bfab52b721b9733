"""`fold`: constant folding.

Wraps onnxscript's ``optimizer.fold_constants`` (ours: the options, the size guards
and the counters). Size limits keep folding from reading or materializing large
weights: a node is only evaluated when its inputs and outputs stay below them,
so the pass never loads the whole model.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import onnx_ir as ir
from onnxscript.optimizer import fold_constants

from llmopt.core import graph_util
from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    input_size_limit: int = option(8192, "largest constant input (elements) a folded node may read")
    output_size_limit: int = option(512 * 512, "largest constant (elements) folding may create")
    shape_inference: bool = option(True, "run ONNX shape inference node by node while folding")

    def __post_init__(self):
        if self.input_size_limit < 0 or self.output_size_limit < 0:
            raise ValueError("size limits must be >= 0")


@register_pass
class FoldConstants(Pass):
    name = "fold"
    summary = "Constant folding: evaluate nodes whose inputs are all constants (size-limited)."
    Options = FoldOptions

    def run(self, model: ir.Model) -> bool:
        before = Counter(graph_util.op_histogram(model))
        result = fold_constants(
            model,
            onnx_shape_inference=self.options.shape_inference,
            input_size_limit=self.options.input_size_limit,
            output_size_limit=self.options.output_size_limit,
        )
        after = Counter(graph_util.op_histogram(model))
        for op, n in (before - after).items():
            self.count(f"folded.{op}", n)
        return result.modified

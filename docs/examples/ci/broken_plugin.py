"""A deliberately broken plugin: it "optimizes" by scaling the first weight matrix by 4.

The CI example (gate.sh with BROKEN=1) puts it in the pipeline to show that llmopt stops the
compile, names the pass, exits 1 and writes no artifact.
"""

import numpy as np
import onnx_ir as ir

from llmopt import Pass


class ScaleFirstWeight(Pass):
    name = "scale-first-weight"
    summary = "Multiplies the first MatMul weight by 4 (broken on purpose)"

    def run(self, model: ir.Model) -> bool:
        for node in model.graph:
            weight = node.inputs[1] if node.op_type == "MatMul" else None
            if weight is not None and weight.const_value is not None:
                weight.const_value = ir.tensor(weight.const_value.numpy() * np.float32(4.0), name=weight.name)
                return True
        return False

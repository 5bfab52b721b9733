"""`quantize-moe`: the experts of each ``com.microsoft::MoE`` node to 8 or 4 bits → ``QMoE``.

Mixture-of-experts models keep most of their weights in the experts, so this is where bits pay
most. Each expert's fc1 (gate/up) and fc2 (down) weight is quantized on its own, blockwise along
its input dimension (``block_size``, reduced to the largest power of two ≥ 16 that divides both
input widths when it does not), symmetric or with zero points, with the grids every llmopt
quantizer uses (``llmopt.quant``). The result is ONNX Runtime's ``QMoE`` with raw (not prepacked)
``[experts, out, in·bits/8]`` weights; its routing and activation attributes are the ``MoE``
node's. Biases stay float. One layer's experts are read at a time (memory-mapped) and their float
originals dropped once nothing reads them.

The router and shared experts are ordinary linears: the dense passes (``quantize-dynamic``,
``weight-only``) quantize them by their own rules.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass
from llmopt.quant import lower
from llmopt.quant.edit import QuantEdit
from llmopt.quant.sites import MS_DOMAIN
from llmopt.quant.spec import QuantSpec
from llmopt.quant.tensor import quantize

_WEIGHTS = {"fc1": 2, "fc2": 4}  # MoE input positions of the expert weights


@dataclasses.dataclass(frozen=True)
class QuantizeMoEOptions:
    bits: int = option(4, "bits per expert weight: 8 or 4")
    block_size: int = option(32, "input elements per scale (power of two >= 16); reduced to fit the expert widths")
    symmetric: bool = option(True, "symmetric grid (QMoE's default zero point); false: a zero point per block")
    accuracy_level: int = option(4, "QMoE's CPU accuracy level: 4 = int8 activations for 4-bit experts; 0 = fp32 "
                                    "(8-bit experts always use int8 activations)")

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        self.spec(self.block_size)  # validates block_size

    def spec(self, block_size: int) -> QuantSpec:
        dtype = "uint4" if self.bits == 4 else "uint8"
        return QuantSpec(dtype, symmetric=self.symmetric, granularity="block", block_size=block_size)


def fitting_block(block: int, widths: tuple[int, ...]) -> int | None:
    """The largest power of two ≤ ``block`` and ≥ 16 that divides every width, if any."""
    while block >= 16:
        if all(w % block == 0 for w in widths):
            return block
        block //= 2
    return None


@register_pass
class QuantizeMoE(Pass):
    name = "quantize-moe"
    summary = "Mixture-of-experts expert weights to 8 or 4 bits: MoE → QMoE (blockwise, per expert)."
    Options = QuantizeMoEOptions

    def run(self, model: ir.Model) -> bool:
        edit = QuantEdit(self, model)
        for node in list(model.graph):
            if node.op_type != "MoE" or node.domain != MS_DOMAIN:
                continue
            replacement = self._qmoe(edit, node)
            if replacement is not None:
                edit.replace_node(node, [replacement])
                self.count("moe")
        return edit.finish()

    def _qmoe(self, edit: QuantEdit, node: ir.Node) -> ir.Node | None:
        inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
        fc1, fc2 = inputs[_WEIGHTS["fc1"]], inputs[_WEIGHTS["fc2"]]
        if len(node.inputs) > 6 and any(v is not None for v in node.inputs[6:]):
            self.count("skipped.fc3")  # separate gate weights: not emitted by `fuse`
            return None
        if fc1 is None or fc2 is None or fc1.const_value is None or fc2.const_value is None:
            self.count("skipped.non_constant")
            return None
        widths = (fc1.const_value.shape[2], fc2.const_value.shape[2])
        block = fitting_block(self.options.block_size, widths)
        if block is None:
            self.count("skipped.width")
            self.warn(f"{node.name}: expert input widths {widths} have no block size >= 16 dividing both; left in float")
            return None
        if block != self.options.block_size:
            self.count("block_size_reduced")
        spec = self.options.spec(block)
        packed = {}
        for key, value in (("fc1", fc1), ("fc2", fc2)):
            packed[key] = self._quantize_experts(edit, node, value, spec)
        bits = self.options.bits
        q_inputs = [inputs[0], inputs[1],
                    packed["fc1"][0], packed["fc1"][1], inputs[3],
                    packed["fc2"][0], packed["fc2"][1], inputs[5],
                    None, None, None,  # fc3 weights, scales, bias
                    packed["fc1"][2], packed["fc2"][2]]
        while q_inputs[-1] is None:
            q_inputs.pop()
        q = ir.node("QMoE", q_inputs, domain=MS_DOMAIN, name=f"{node.name or 'moe'}_q{bits}",
                    attributes={**{k: a.value for k, a in node.attributes.items()}, "expert_weight_bits": bits,
                                "block_size": block, "weights_prepacked": 0, "quant_type": "int",
                                "accuracy_level": self.options.accuracy_level})
        return q

    def _quantize_experts(self, edit: QuantEdit, node: ir.Node, weights: ir.Value, spec: QuantSpec):
        """One expert at a time: packed weights [E, N, K·bits/8], scales [E, N, K/block], zero points."""
        experts = weights.const_value.shape[0]
        datas, scales, zeros = [], [], []
        err_sq = norm_sq = 0.0
        for e in range(experts):
            w = np.asarray(weights.const_value.numpy()[e], dtype=np.float32).T  # [K, N], as a MatMul reads it
            qt = quantize(w, spec)
            rel = qt.error(w)
            norm = float(np.square(w, dtype=np.float64).sum())
            err_sq, norm_sq = err_sq + rel * rel * norm, norm_sq + norm
            data, zp = lower.pack_nbits(qt.q, qt.zero, self.options.bits, spec.symmetric)
            datas.append(data.reshape(data.shape[0], -1))
            scales.append(qt.scale.astype(np.float32))
            if zp is not None:
                zeros.append(zp)
            del w, qt
        base = weights.name or "experts"
        edit.errors.record(base, (err_sq / norm_sq) ** 0.5 if norm_sq else 0.0, self.options.bits, "rtn",
                           spec.block_size, node)
        return (edit.initializer(f"{base}_q{self.options.bits}", np.stack(datas)),
                edit.initializer(f"{base}_scales", np.stack(scales)),
                edit.initializer(f"{base}_zero_points", np.stack(zeros)) if zeros else None)

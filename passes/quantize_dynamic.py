"""`quantize-dynamic`: int8 weights, activations quantized at run time.

- ``MatMul(x, W)``, ``MatMul(x, Transpose(W))``, ``Gemm(x, W[, b])`` and the fuse
  pass's ``com.microsoft::FusedMatMul(x, W)`` (``transB``, ``alpha``; a tied lm_head
  after ``fuse``) with a constant 2-D ``W`` get symmetric int8 weights, lowered to
  one of two ONNX Runtime kernels (``kernel`` option):

  * ``nbits`` (default): ``com.microsoft::MatMulNBits`` with ``bits=8``, one
    scale per ``block_size`` input rows of each output column, and
    ``accuracy_level=4`` (activations quantized to int8 per block at run time,
    int8 dot products). Measured faster for decode on AVX512-VNNI CPUs
    (docs/benchmarks.md);
  * ``dynamic``: ``com.microsoft::DynamicQuantizeMatMul`` with one scale per
    output channel (or per tensor) and the activation quantized per tensor. Weights are
    on 7 bits (-63..63) by default (``reduce_range``): ONNX Runtime's u8 x s8 kernel on x86
    CPUs without VNNI adds pairs of products in int16 and saturates on full-range int8
    weights (emulated in tests/test_quantize_dynamic.py: outputs move by several units).

  A following bias ``Add`` is folded into the kernel's bias input.
- ``Gather(E, ids)`` on a constant float32 embedding table becomes a Gather of int8
  rows times a Gather of per-row scales (standard ops, so any execution provider
  runs it; ``weight-only`` uses ``GatherBlockQuantized`` instead).

Weights are read one tensor at a time (memory-mapped) and the float originals
are dropped once nothing uses them (a table tied to the lm_head through a
Transpose goes when both its Gather and its MatMul are quantized). Each quantized
weight's relative RMS error goes to the model's metadata (``llmopt/quant/error.py``).
Sites, grids and kernels come from ``llmopt.quant``; this pass only chooses them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass
from llmopt.quant import lower
from llmopt.quant.edit import QuantEdit
from llmopt.quant.spec import QuantSpec
from llmopt.quant.tensor import quantize


@dataclasses.dataclass(frozen=True)
class QuantizeDynamicOptions:
    kernel: Literal["nbits", "dynamic"] = option("nbits", "MatMulNBits (blockwise) or DynamicQuantizeMatMul")
    block_size: int = option(128, "nbits: input rows per scale (power of two, >= 16)")
    accuracy_level: int = option(4, "nbits: 4 = int8 activations and int8 compute; 0 = fp32 compute")
    per_channel: bool = option(True, "dynamic kernel and Gather: one scale per channel/row (else per tensor)")
    reduce_range: bool = option(True, "dynamic kernel: 7-bit weights (-63..63), which no x86 CPU "
                                      "saturates; false: full int8, for CPUs with VNNI only")
    matmul: bool = option(True, "quantize MatMul/Gemm weights")
    gather: bool = option(True, "quantize embedding tables read by Gather")
    min_elements: int = option(4096, "leave weights with fewer elements in float")
    exclude: tuple[str, ...] = option((), "node or weight name patterns to leave in float (fnmatch, ';'-separated)")

    def __post_init__(self):
        if self.min_elements < 0:
            raise ValueError("min_elements must be >= 0")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        self.weight_spec  # validates block_size

    @property
    def weight_spec(self) -> QuantSpec:
        if self.kernel == "nbits":  # symmetric uint8 blocks: MatMulNBits' default zero point 128
            return QuantSpec("uint8", symmetric=True, granularity="block", block_size=self.block_size)
        # ONNX Runtime's u8 x s8 kernel on x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
        # adds pairs of products in int16 (VPMADDUBSW), which saturates: 255 * 127 * 2 > 32767.
        # Weights on -63..63 keep every pair in range (ONNX Runtime's own ``reduce_range``).
        return QuantSpec("int8", granularity="channel" if self.per_channel else "tensor", axis=1,
                         reduce_range=self.reduce_range)

    @property
    def table_spec(self) -> QuantSpec:
        return QuantSpec("int8", granularity="channel" if self.per_channel else "tensor", axis=0)


@register_pass
class QuantizeDynamic(Pass):
    name = "quantize-dynamic"
    summary = "int8 weights (symmetric, per channel) with activations quantized at run time, for MatMul/Gemm/Gather."
    Options = QuantizeDynamicOptions

    def run(self, model: ir.Model) -> bool:
        o, edit = self.options, QuantEdit(self, model)
        if o.matmul:
            for site in edit.linear_sites(o.min_elements, o.exclude):
                w = site.weight_array()
                qt = quantize(w, o.weight_spec)
                edit.record(site.name, qt, w, site.node)
                edit.replace_site(site, lower.matmul_nbits(edit, site, qt, o.accuracy_level) if o.kernel == "nbits"
                                  else lower.dynamic_quantize_matmul(edit, site, qt))
        if o.gather:
            for node, table in edit.tables(o.min_elements, o.exclude):
                w = table.const_value.numpy()
                qt = quantize(w, o.table_spec)
                edit.record(table.name, qt, w, node)
                edit.replace_node(node, lower.gather_rows(edit, node, table, qt))
                self.count("gather")
        return edit.finish()

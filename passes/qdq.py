"""`qdq`: static post-training quantization in QDQ form (calibrated W8A8).

Every MatMul/Gemm with a constant weight gets

    a ─ QuantizeLinear ─ DequantizeLinear ─┐
                                           MatMul ─ (+ bias)
    W_int8 ─────────── DequantizeLinear ───┘

with the weight quantized offline (symmetric int8, one scale per output channel by default) and
the activation's scale and zero point calibrated by running the model over text (``calibration``,
``samples``, ``seq_len``) with a streaming observer per activation; ``method`` picks the range
(minmax, percentile, entropy). Activations are int8 (symmetric, as the CUDA and TensorRT execution
providers consume; the default) or uint8 with a zero point. Inputs shared by several MatMuls
(packed QKV, gate/up) get one Q/DQ pair. ONNX Runtime fuses the pattern into its integer kernels.

Each quantized weight's relative RMS error goes to the model's quantization-error metadata (see
``quantize-dynamic``), as do embedding tables with ``gather=true`` (int8 rows).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass
from llmopt.errors import PipelineError
from llmopt.quant import lower
from llmopt.quant.edit import QuantEdit
from llmopt.quant.sites import linear_sites
from llmopt.quant.spec import CALIBRATION_METHODS, QuantSpec
from llmopt.quant.tensor import quantize


@dataclasses.dataclass(frozen=True)
class QDQOptions:
    activations: str = option("int8", "int8 (symmetric) or uint8 (with a zero point)")
    per_channel: bool = option(True, "weights: one scale per output channel (else per tensor)")
    method: str = option("minmax", "activation range: minmax | percentile | entropy")
    percentile: float = option(99.99, "percentile method: the |x| percentile kept")
    calibration: str = option("builtin", "a text file tokenized with the model's tokenizer, 'builtin' (KJV training chapters), or 'random' (ids, for untrained test models)")
    samples: int = option(16, "calibration sequences")
    seq_len: int = option(128, "tokens per calibration sequence")
    gather: bool = option(False, "also quantize embedding tables read by Gather (int8 rows)")
    min_elements: int = option(4096, "leave weights with fewer elements in float")
    exclude: tuple[str, ...] = option((), "node or weight name patterns to leave in float (fnmatch, ';'-separated)")

    def __post_init__(self):
        if self.activations not in ("int8", "uint8"):
            raise PipelineError(f"qdq: activations must be int8 or uint8, got {self.activations!r}")
        if self.method not in CALIBRATION_METHODS:
            raise PipelineError(f"qdq: method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}")
        self.activation_spec  # validates

    @property
    def activation_spec(self) -> QuantSpec:
        symmetric = self.activations == "int8"  # the full signed range: calibrated ranges clip anyway
        return QuantSpec(dtype=self.activations, symmetric=symmetric, narrow_range=not symmetric,
                         calibration=self.method, percentile=self.percentile)

    @property
    def weight_spec(self) -> QuantSpec:
        return QuantSpec(dtype="int8", symmetric=True, granularity="channel" if self.per_channel else "tensor", axis=1)


@register_pass
class QDQ(Pass):
    name = "qdq"
    summary = "Static int8 QDQ: weights quantized offline per channel, activations calibrated on text."
    Options = QDQOptions

    def run(self, model: ir.Model) -> bool:
        o, edit = self.options, QuantEdit(self, model)
        ranges = self._ranges(model)
        dq_of: dict[str, ir.Value] = {}  # one Q/DQ pair per activation, shared by its MatMuls
        for site in edit.linear_sites(o.min_elements, o.exclude):
            a = site.activation
            if a.name not in dq_of:
                dq_of[a.name] = self._quantize_activation(edit, a, ranges[a.name])
            w = site.weight_array()
            qt = quantize(w, o.weight_spec)
            edit.record(site.name, qt, w, site.node)
            edit.replace_site(site, lower.qdq_matmul(edit, site, qt, dq_of[a.name]))
        if o.gather:
            for node, table in edit.tables(o.min_elements, o.exclude):
                w = table.const_value.numpy()
                qt = quantize(w, QuantSpec("int8", granularity="channel", axis=0))
                edit.record(table.name, qt, w, node)
                edit.replace_node(node, lower.gather_rows(edit, node, table, qt))
                self.count("gather")
        return edit.finish()

    def _ranges(self, model: ir.Model) -> dict[str, tuple[float, float]]:
        """Each quantized MatMul input's calibrated range (``method`` over a streaming histogram)."""
        from llmopt.ort import calibration

        o, spec = self.options, self.options.activation_spec
        sites = linear_sites(model.graph, o.min_elements, o.exclude, fold_bias=False)
        inputs = sorted({s.activation.name for s in sites if s.activation is not None})
        obs, sequences = calibration.observe(model, inputs, o, calibration.Histogram)
        self.count("calibration_sequences", sequences)
        return {name: ob.range(spec.calibration, spec.percentile) for name, ob in obs.items()}

    def _quantize_activation(self, edit: QuantEdit, a: ir.Value, lo_hi: tuple[float, float]) -> ir.Value:
        spec = self.options.activation_spec
        scale, zero = spec.scale_zero_point(np.array(lo_hi[0]), np.array(lo_hi[1]))
        nodes = lower.quantize_dequantize(edit, a, scale, zero, np.int8 if spec.dtype == "int8" else np.uint8)
        producer = a.producer()
        if producer is not None:
            edit.graph.insert_after(producer, nodes)
        else:
            edit.graph.insert_before(next(iter(edit.graph)), nodes)
        self.count("activations")
        return nodes[-1].outputs[0]

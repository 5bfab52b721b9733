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

from llmopt.passes.quantize_dynamic import QuantizeDynamic, dense_error, is_matmul
from llmopt.core.pass_base import option
from llmopt.quant.spec import CALIBRATION_METHODS, QuantSpec
from llmopt.core.registry import register_pass


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

    matmul = True
    kernel = "qdq"

    def __post_init__(self):
        from llmopt.errors import PipelineError

        if self.activations not in ("int8", "uint8"):
            raise PipelineError(f"qdq: activations must be int8 or uint8, got {self.activations!r}")
        if self.method not in CALIBRATION_METHODS:
            raise PipelineError(f"qdq: method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}")
        self.activation_spec  # validates

    @property
    def activation_spec(self) -> QuantSpec:
        return QuantSpec(dtype=self.activations, symmetric=self.activations == "int8", calibration=self.method,
                         percentile=self.percentile)

    @property
    def weight_spec(self) -> QuantSpec:
        return QuantSpec(dtype="int8", symmetric=True, granularity="channel" if self.per_channel else "tensor", axis=1)


@register_pass
class QDQ(QuantizeDynamic):
    name = "qdq"
    summary = "Static int8 QDQ: weights quantized offline per channel, activations calibrated on text."
    Options = QDQOptions

    def run(self, model: ir.Model) -> bool:

        from llmopt.ort import calibration

        inputs = sorted({n.inputs[0].name for n in model.graph if is_matmul(n) and n.inputs[0] is not None
                         and self._constant_weight(n.inputs[1]) and not self._excluded(n.name)})
        batches = calibration.model_batches(model, self.options.calibration, self.options.seq_len, self.options.samples)
        obs = calibration.collect(model, inputs, batches, lambda _: [calibration.Histogram()])
        spec = self.options.activation_spec
        self._ranges = {name: o[0].range(spec.calibration, spec.percentile) for name, o in obs.items()}
        self._qdq_of: dict[str, ir.Value] = {}
        self.count("calibration_sequences", len(batches))
        return super().run(model)

    def _activation(self, a: ir.Value) -> ir.Value:
        """One QuantizeLinear → DequantizeLinear per activation value, shared by its MatMuls."""
        if a.name in self._qdq_of:
            return self._qdq_of[a.name]
        spec = self.options.activation_spec
        lo, hi = self._ranges[a.name]
        scale, zero = spec.scale_zero_point(np.array(lo), np.array(hi))
        zdtype = np.int8 if spec.dtype == "int8" else np.uint8
        s = self._initializer(f"{a.name}_scale", np.array(scale, np.float32))
        z = self._initializer(f"{a.name}_zero_point", np.array(zero, zdtype))
        q = ir.node("QuantizeLinear", [a, s, z], name=f"{a.name}_quantize")
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{a.name}_dequantize")
        dq.outputs[0].shape, dq.outputs[0].type = a.shape, a.type
        producer = a.producer()
        if producer is not None:
            self._graph.insert_after(producer, [q, dq])
        else:
            self._graph.insert_before(next(iter(self._graph)), [q, dq])
        self._qdq_of[a.name] = dq.outputs[0]
        self.count("activations")
        return dq.outputs[0]

    def _lower(self, node: ir.Node, a: ir.Value, w: np.ndarray, bias: ir.Value | None, alpha: float, base: str):
        if a.name not in self._ranges:  # an activation calibration did not see (excluded by name)
            raise ValueError(f"qdq: no calibrated range for {a.name}")
        spec = self.options.weight_spec
        if spec.granularity == "channel":
            lo, hi = w.min(axis=0), w.max(axis=0)
        else:
            lo, hi = np.array(w.min()), np.array(w.max())
        scale, _ = spec.scale_zero_point(lo, hi)
        scale = (scale * np.float32(alpha)).astype(np.float32)
        q = np.clip(np.rint(w * np.float32(alpha) / scale), -127, 127).astype(np.int8)
        if alpha:
            self._record_error(base, dense_error(w, q, scale / np.float32(alpha)), 8, "rtn", None, node)
        wq = self._initializer(f"{base}_int8", q)
        ws = self._initializer(f"{base}_scale", scale)
        wz = self._initializer(f"{base}_zero_point", np.zeros(scale.shape, np.int8))
        attrs = {"axis": 1} if spec.granularity == "channel" else {}
        wdq = ir.node("DequantizeLinear", [wq, ws, wz], attributes=attrs, name=f"{base}_dequantize")
        mm = ir.node("MatMul", [self._activation(a), wdq.outputs[0]], name=f"{node.name or 'matmul'}_qdq")
        if bias is None:
            return [wdq, mm]
        add = ir.node("Add", [mm.outputs[0], bias], name=f"{node.name or 'matmul'}_bias")
        return [wdq, mm, add]

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
Transpose goes when both its Gather and its MatMul are quantized). MatMuls are
quantized before Gathers, so a subclass can reuse an lm_head's quantized table.
This is the first quantization of the spine; calibrated QDQ (static)
quantization is a separate pass.

Every quantizing pass (this one, ``weight-only``, ``qdq``) records, per float
weight it quantizes, the relative RMS error of the dequantized weight
``‖W_deq − W‖ / ‖W‖`` (measured while that one tensor is in memory, in chunks),
merged into ``model.metadata_props[QUANT_ERROR_KEY]`` as JSON
``{weight name: {"rel_rmse", "pass", "bits", "method", "block_size"[, "scope"]}}``;
the compile manifest reports it. ``method`` is ``rtn`` (round to nearest on the
min/max range) or ``gptq``; ``block_size`` is null for per-channel, per-row or
per-tensor scales; ``scope`` is the module that reads the weight when the
exporter recorded it (torch.onnx names transposed weights ``val_NN``; the report
places them in their layer by it). A table quantized twice (tied embeddings, two
different copies) keeps the larger error.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import json
import math
from collections.abc import Iterable
from typing import Literal

import numpy as np
import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.core.pass_base import Pass, option
from llmopt.quant.spec import QUANT_ERROR_KEY
from llmopt.core.registry import register_pass

MS_DOMAIN = "com.microsoft"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


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
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")


def quantize_symmetric(w: np.ndarray, axis: int | None, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """int8 symmetric quantization on ``-levels..levels``; ``axis`` is the axis that keeps one scale per index."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max(), dtype=np.float32)
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=reduce, keepdims=True)
    scale = np.array(amax / float(levels), dtype=np.float32)  # an array even per tensor (0-d)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -levels, levels).astype(np.int8)
    return q, scale


def blocks(w: np.ndarray, block: int) -> np.ndarray:
    """``w`` [K, N] → [N, n_blocks, block], zero-padded along K: MatMulNBits' block layout."""
    k, n = w.shape
    nb = -(-k // block)
    wt = np.zeros((n, nb * block), dtype=np.float32)
    wt[:, :k] = w.T
    return wt.reshape(n, nb, block)


def quantize_blockwise_u8(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [K, N] → MatMulNBits (bits=8) layout: uint8 ``[N, n_blocks, block_size]`` holding
    ``q + 128`` (symmetric, so the kernel's default zero point 128 applies) and scales ``[N * n_blocks]``."""
    wt = blocks(w, block_size)
    scale = np.abs(wt).max(axis=-1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(wt / scale), -127, 127) + 128).astype(np.uint8)
    return q, scale.reshape(-1).astype(np.float32)


def is_matmul(node: ir.Node) -> bool:
    """A node this pass quantizes when its weight input is constant: MatMul, Gemm, or the fuse pass's
    ``com.microsoft::FusedMatMul`` (e.g. a tied lm_head, ``x @ Transpose(E)``)."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type in ("MatMul", "Gemm")
    return node.domain == MS_DOMAIN and node.op_type == "FusedMatMul"


def module_scope(node: ir.Node) -> str | None:
    """The module a node came from, as torch.onnx records it (``model.layers.0.mlp.down_proj``), or None."""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list):
        return None
    modules = [str(x) for x in scopes[:-1] if x]  # the last entry names the op, not a module
    return modules[-1] if modules else None


# -- quantization error --------------------------------------------------------

_ERROR_CHUNK = 1 << 20  # elements per chunk when measuring an error (bounded temporaries)


def rel_rmse(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """``‖deq − ref‖ / ‖ref‖`` over ``(ref, deq)`` chunks of one tensor (sums in float64)."""
    err = norm = 0.0
    for ref, deq in pairs:
        ref = np.asarray(ref, np.float64)
        d = np.asarray(deq, np.float64) - ref
        err += float(np.vdot(d, d))
        norm += float(np.vdot(ref, ref))
    return math.sqrt(err / norm) if norm > 0 else 0.0


def _chunks(rows: int, row_elements: int) -> list[slice]:
    step = max(1, _ERROR_CHUNK // max(1, row_elements))
    return [slice(i, i + step) for i in range(0, rows, step)]


def block_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero, block: int) -> float:
    """Relative RMS error of MatMulNBits-layout blocks against ``w`` [K, N]: ``q`` [N, n_blocks, block]
    integers, ``scale`` [N, n_blocks] (or flat), ``zero`` [N, n_blocks] or a scalar. Padding rows
    dequantize to 0, so the padded layout measures the error of ``w`` itself."""
    n, nb = q.shape[0], q.shape[1]
    scale = np.reshape(scale, (n, nb, 1))
    zero = np.reshape(zero, (n, nb, 1)) if np.ndim(zero) else zero

    def pairs():
        for s in _chunks(n, nb * block):
            z = zero[s] if np.ndim(zero) else zero
            yield blocks(w[:, s], block), (q[s].astype(np.float32) - z) * scale[s]

    return rel_rmse(pairs())


def dense_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero=0) -> float:
    """Relative RMS error of ``(q - zero) * scale`` against ``w`` (same 2-D shape); ``scale`` and ``zero``
    broadcast: per tensor, per column ([1, C] or [C]) or per row ([R, 1])."""
    rows = w.shape[0]
    scale = np.asarray(scale, np.float32)

    def pick(a, s):
        return a[s] if np.ndim(a) == w.ndim and np.shape(a)[0] == rows else a

    def pairs():
        for s in _chunks(rows, w[0].size):
            yield w[s], (q[s].astype(np.float32) - pick(zero, s)) * pick(scale, s)

    return rel_rmse(pairs())


@register_pass
class QuantizeDynamic(Pass):
    name = "quantize-dynamic"
    summary = "int8 weights (symmetric, per channel) with activations quantized at run time, for MatMul/Gemm/Gather."
    Options = QuantizeDynamicOptions

    def run(self, model: ir.Model) -> bool:
        self._graph = model.graph
        self._names = {v.name for v in _all_values(model.graph)}
        self._errors: dict[str, dict] = {}
        modified = False
        # MatMuls first: a tied lm_head's quantized table may then serve its Gather too (weight-only).
        if self.options.matmul:
            for node in list(model.graph):
                if is_matmul(node):
                    modified |= self._matmul(node)
        if self.options.gather:
            for node in list(model.graph):
                if node.domain in ("", "ai.onnx") and node.op_type == "Gather":
                    modified |= self._gather(node)
        if modified:
            if not any(d == MS_DOMAIN for d in model.opset_imports):
                model.opset_imports[MS_DOMAIN] = 1
            self._drop_unused_initializers()
            self._write_errors(model)
        return modified

    # -- helpers ---------------------------------------------------------------

    def _excluded(self, *names: str | None) -> bool:
        return any(n and fnmatch.fnmatchcase(n, pat) for n in names for pat in self.options.exclude)

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _record_error(self, name: str, error: float, bits: int, method: str, block_size: int | None,
                      node: ir.Node | None = None) -> None:
        """Note the relative RMS error of the quantized copy of float weight ``name`` (read by ``node``)."""
        entry = {"rel_rmse": round(float(error), 6), "pass": self.name, "bits": int(bits), "method": method,
                 "block_size": None if block_size is None else int(block_size)}
        scope = module_scope(node) if node is not None else None
        if scope:
            entry["scope"] = scope
        old = self._errors.get(name)
        if old is None or entry["rel_rmse"] > old["rel_rmse"]:
            self._errors[name] = entry

    def _write_errors(self, model: ir.Model) -> None:
        """Merge this run's errors into the model's metadata (an earlier pass's entries stay)."""
        if not self._errors:
            return
        try:
            merged = json.loads(model.metadata_props.get(QUANT_ERROR_KEY) or "{}")
        except ValueError:
            merged = None
        if not isinstance(merged, dict):
            self.warn(f"metadata {QUANT_ERROR_KEY} was not a JSON object; replaced")
            merged = {}
        merged.update(self._errors)
        model.metadata_props[QUANT_ERROR_KEY] = json.dumps(merged)

    def _initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name = self._unique(base)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self._graph.register_initializer(value)
        return value

    def _constant_weight(self, value: ir.Value | None) -> tuple[ir.Value, bool] | None:
        """The 2-D float initializer behind ``value`` (directly or through Transpose(perm=[1,0]))."""
        if value is None:
            return None
        transposed = False
        producer = value.producer()
        if producer is not None:
            perm = producer.attributes.get("perm")
            if producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
                return None
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                return None
            value, transposed = producer.inputs[0], True
        if not value.is_initializer() or value.is_graph_input() or value.const_value is None:
            return None
        t = value.const_value
        if t.dtype not in _FLOATS or len(t.shape) != 2:
            return None
        if t.shape[0] * t.shape[1] < self.options.min_elements:
            return None
        return value, transposed

    def _matmul(self, node: ir.Node) -> bool:
        a, b = node.inputs[0], node.inputs[1]
        bias = None
        alpha = 1.0
        if node.op_type == "Gemm":
            attrs = {k: v.value for k, v in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("beta", 1.0) != 1.0:
                self.count("skipped.gemm_attrs")
                return False
            alpha = float(attrs.get("alpha", 1.0))
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            found = self._constant_weight(b)
            if found is None:
                return False
            weight, transposed = found
            transposed ^= bool(attrs.get("transB", 0))
        elif node.op_type == "FusedMatMul":  # com.microsoft: alpha * op(A) @ op(B), from the fuse pass
            attrs = {k: v.value for k, v in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
                self.count("skipped.fused_matmul_attrs")
                return False
            alpha = float(attrs.get("alpha", 1.0))
            found = self._constant_weight(b)
            if found is None:
                return False
            weight, transposed = found
            transposed ^= bool(attrs.get("transB", 0))
        else:
            found = self._constant_weight(b)
            if found is None:
                return False
            weight, transposed = found
        if a is None or a.dtype not in (None, ir.DataType.FLOAT):
            self.count("skipped.non_fp32_activation")
            return False
        if self._excluded(node.name, weight.name):
            self.count("excluded")
            return False
        w = weight.const_value.numpy().astype(np.float32, copy=False)  # one tensor, memory-mapped
        if transposed:
            w = w.T
        n = w.shape[1]
        out = node.outputs[0]
        # A bias Add right after a MatMul becomes the fused op's bias input.
        consumer_add = None
        if bias is None and node.op_type != "Gemm" and len(out.uses()) == 1 and not out.is_graph_output():
            use = next(iter(out.uses()))
            cand = use.node
            if cand.op_type == "Add" and cand.domain in ("", "ai.onnx"):
                other = cand.inputs[1 - use.idx]
                ct = other.const_value if other is not None and other.is_initializer() else None
                if ct is not None and ct.dtype == ir.DataType.FLOAT and list(ct.shape) == [n]:
                    bias, consumer_add = other, cand
        if bias is not None and (bias.const_value is None or list(bias.const_value.shape) != [n]):
            self.count("skipped.bias_shape")
            return False
        lowered = self._lower(node, a, w, bias, alpha, weight.name or "weight")
        lowered = lowered if isinstance(lowered, list) else [lowered]
        new = lowered[-1]
        final_out = consumer_add.outputs[0] if consumer_add is not None else out
        new.outputs[0].shape, new.outputs[0].type = final_out.shape, final_out.type
        self._graph.insert_before(node, lowered)
        replaced = [node] + ([consumer_add] if consumer_add is not None else [])
        graph_util.replace_value(final_out, new.outputs[0])
        for n in reversed(replaced):
            self._graph.remove(n, safe=True)
        self.count("matmul")
        if consumer_add is not None or (bias is not None and node.op_type == "Gemm"):
            self.count("bias_folded")
        return True

    def _lower(self, node: ir.Node, a: ir.Value, w: np.ndarray, bias: ir.Value | None, alpha: float, base: str) -> ir.Node | list[ir.Node]:
        """The quantized node(s) computing ``a @ (alpha * w) + bias`` (``w`` is [K, N] float32);
        with a list, the last node gives the result."""
        k, n = w.shape
        if self.options.kernel == "nbits":
            q, scale = quantize_blockwise_u8(w, self.options.block_size)
            self._record_error(base, block_error(w, q, scale, 128, self.options.block_size), 8, "rtn",
                               self.options.block_size, node)
            inputs = [a, self._initializer(f"{base}_q8", q), self._initializer(f"{base}_scales", scale * np.float32(alpha))]
            if bias is not None:
                inputs += [None, None, bias]  # no zero points (default 128), no g_idx, then the bias
            return ir.node(
                "MatMulNBits", inputs, domain=MS_DOMAIN, name=f"{node.name or 'matmul'}_q8",
                attributes={"K": k, "N": n, "bits": 8, "block_size": self.options.block_size,
                            "accuracy_level": self.options.accuracy_level},
            )
        # ONNX Runtime's u8 x s8 kernel on x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
        # adds pairs of products in int16 (VPMADDUBSW), which saturates: 255 * 127 * 2 > 32767.
        # Weights on -63..63 keep every pair in range (ONNX Runtime's own ``reduce_range``).
        bits = 7 if self.options.reduce_range else 8
        q, scale = quantize_symmetric(w, axis=1 if self.options.per_channel else None, levels=2 ** (bits - 1) - 1)
        self._record_error(base, dense_error(w, q, scale), bits, "rtn", None, node)
        scale = (scale.reshape(-1) * np.float32(alpha)).astype(np.float32)
        inputs = [a, self._initializer(f"{base}_int8", q), self._initializer(f"{base}_scale", scale)]
        if bias is not None:
            inputs += [None, bias]  # no zero point (symmetric), then the bias
        return ir.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, name=f"{node.name or 'matmul'}_dq")

    def _embedding_table(self, node: ir.Node) -> ir.Value | None:
        """The constant float32 table [V, H] a ``Gather(axis=0)`` reads, unless excluded or too small."""
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != 0:
            return None
        found = self._constant_weight(node.inputs[0])
        if found is None or found[1]:
            return None
        weight = found[0]
        if weight.const_value.dtype != ir.DataType.FLOAT:
            self.count("skipped.non_fp32_table")
            return None
        if self._excluded(node.name, weight.name):
            self.count("excluded")
            return None
        return weight

    def _gather(self, node: ir.Node) -> bool:
        ids = node.inputs[1]
        weight = self._embedding_table(node)
        if weight is None:
            return False
        table = weight.const_value.numpy()
        q, scale = quantize_symmetric(table, axis=0 if self.options.per_channel else None)
        self._record_error(weight.name, dense_error(table, q, scale), 8, "rtn", None, node)
        del table
        scale = np.broadcast_to(scale, (q.shape[0], 1)).astype(np.float32)
        base = weight.name or "embedding"
        q_init = self._initializer(f"{base}_int8", q)
        s_init = self._initializer(f"{base}_row_scale", scale)
        out = node.outputs[0]
        g_q = ir.node("Gather", [q_init, ids], attributes={"axis": 0}, name=f"{node.name}_q")
        cast = ir.node("Cast", [g_q.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{node.name}_cast")
        g_s = ir.node("Gather", [s_init, ids], attributes={"axis": 0}, name=f"{node.name}_scale")
        mul = ir.node("Mul", [cast.outputs[0], g_s.outputs[0]], name=f"{node.name}_dequant")
        mul.outputs[0].shape, mul.outputs[0].type = out.shape, out.type
        self._graph.insert_before(node, [g_q, cast, g_s, mul])
        graph_util.replace_value(out, mul.outputs[0])
        self._graph.remove(node, safe=True)
        self.count("gather")
        return True

    def _drop_unused_initializers(self) -> None:
        # Transposes of weights we replaced are dead now; remove them first so their inputs free up.
        for node in list(self._graph):
            if node.op_type == "Transpose" and all(not o.uses() and not o.is_graph_output() for o in node.outputs):
                self._graph.remove(node, safe=True)
        graph_util.drop_unused_initializers(self._graph)

def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph.all_nodes():
        yield from node.outputs

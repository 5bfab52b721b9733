"""`weight-only`: blockwise int4 / int8 weights, activations stay float; lowered to ``MatMulNBits``.

Every MatMul/Gemm (and the fuse pass's FusedMatMul) with a constant weight ``W[K, N]`` gets one
scale (and, unless ``symmetric``, one zero point) per ``block_size`` rows of each output column,
and becomes ``com.microsoft::MatMulNBits`` with ``bits`` 4 or 8 and the target's ``accuracy_level``
(4: activations quantized to int8 per block at run time, int8 dot products).

Embedding tables read by ``Gather(E[V, H], ids)`` (``gather``) become ONNX Runtime's
``com.microsoft::GatherBlockQuantized`` with the same ``bits``, ``block_size`` and ``symmetric`` as
the MatMuls: one scale (and zero point) per ``block_size`` elements of each row along the hidden
axis, rounded to nearest (GPTQ needs a layer's inputs; a lookup has none). The layout is
MatMulNBits': ``uint8`` data ``[V, H·bits/8]`` (two 4-bit values a byte, low nibble first),
``gather_axis=0``, ``quantize_axis=1``, float scales ``[V, ⌈H/block⌉]``, uint8 zero points packed
like MatMulNBits' or none (default zero point 2^(bits-1)). That is what ONNX Runtime 1.32's CPU
kernel takes for both 4 and 8 bits (``int4``/``uint4``-typed data only take 4 bits, and the CUDA
kernel only ``uint8``); one kernel dequantizes only the rows looked up. Before, the pass gave
tables ``quantize-dynamic``'s int8 rows (a Gather of int8 rows, a Cast, a Gather of per-row scales
and a Mul). At 4 bits the table is now ~60% of that size and gets the error every MatMul weight
gets (relative RMS ≈ 0.08 on a Gaussian table at block 32, against 0.006 for int8 rows; logits
cosine of the tiny test models drops by about 0.003); at 8 bits it is about the size of int8 rows
(+4% at block 128, +16% at block 32 for scales and zero points) with a smaller error.
``gather_kernel=rows`` keeps the standard-op int8 rows, for execution providers without the contrib
op (the CUDA provider has it for float16 scales only) or to keep the table at 8 bits next to 4-bit
MatMuls.

Tied embeddings (GPT-2, Gemma): the lm_head reads ``Transpose(E)`` (``FusedMatMul(x, E, transB=1)``
after ``fuse``) or an equal copy of ``E``, whose MatMulNBits weight ``[N=V, H/block,
block·bits/8]`` is byte for byte the quantized table. When the lm_head was rounded to nearest (not
GPTQ), with ``alpha`` 1 and ``H`` a multiple of ``block_size``, the Gather reads that very
initializer (``GatherBlockQuantized`` on it with ``quantize_axis=2`` and ``[V, H/block, 1]``
scales, then a Reshape back to ``[..., H]``), so the table is stored once (counter
``gather_shared``); otherwise each gets its own copy. The float table is dropped once neither reads
it.

Two methods choose the integers:

- ``rtn``: round to nearest;
- ``gptq`` (Frantar et al., 2022): quantizes one input row of ``W`` at a time and spreads its
  rounding error over the rows not yet quantized, weighted by the inverse of the layer's input
  Hessian ``H = XᵀX`` (collected by running the model over calibration text, streaming: one K×K
  matrix per distinct MatMul input). It minimizes the error of the layer's *output* on that
  data, not of the weights, which is what perplexity sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import numpy as np
import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.passes.quantize_dynamic import MS_DOMAIN, QuantizeDynamic, block_error, blocks, is_matmul
from llmopt.core.pass_base import option
from llmopt.quant.spec import QuantSpec
from llmopt.core.registry import register_pass


@dataclasses.dataclass(frozen=True)
class WeightOnlyOptions:
    bits: int = option(4, "4 or 8")
    block_size: int = option(32, "input rows per scale: 16, 32, 64, 128, ...")
    symmetric: bool = option(False, "no zero points (the kernel's default zero point is used)")
    method: Literal["rtn", "gptq", "auto"] = option("rtn", "rtn: round to nearest | gptq: error-minimizing, needs calibration text | auto: gptq when calibration text can be tokenized, else rtn (with a warning)")
    accuracy_level: int = option(4, "MatMulNBits accuracy_level: 4 = int8 compute, 0 = fp32 compute")
    calibration: str = option("builtin", "gptq: a text file tokenized with the model's tokenizer, 'builtin' (KJV training chapters), or 'random' (ids, for untrained test models)")
    samples: int = option(32, "gptq: calibration sequences")
    seq_len: int = option(128, "gptq: tokens per calibration sequence")
    damp: float = option(0.01, "gptq: fraction of the mean Hessian diagonal added to its diagonal")
    gather: bool = option(True, "quantize embedding tables read by Gather")
    gather_kernel: Literal["block", "rows"] = option("block", "block: GatherBlockQuantized with bits, block_size and symmetric as for MatMuls (a tied lm_head's table shared) | rows: int8 rows with a scale each, standard ops for any execution provider")
    min_elements: int = option(4096, "leave weights with fewer elements in float")
    exclude: tuple[str, ...] = option((), "node or weight name patterns to leave in float (fnmatch, ';'-separated)")

    # what quantize-dynamic's shared code reads
    matmul = True
    per_channel = True
    kernel = "nbits"

    def __post_init__(self):
        from llmopt.errors import PipelineError

        if self.bits not in (4, 8):
            raise PipelineError(f"weight-only: bits must be 4 or 8, got {self.bits}")
        if self.method not in ("rtn", "gptq", "auto"):
            raise PipelineError(f"weight-only: method must be rtn, gptq or auto, got {self.method!r}")
        if not 0 <= self.accuracy_level <= 4:
            raise PipelineError(f"weight-only: accuracy_level must be 0..4, got {self.accuracy_level}")
        if self.gather_kernel not in ("block", "rows"):
            raise PipelineError(f"weight-only: gather_kernel must be block or rows, got {self.gather_kernel!r}")
        self.spec  # validates block_size

    @property
    def spec(self) -> QuantSpec:
        dtype = {4: "uint4", 8: "uint8"}[self.bits]
        return QuantSpec(dtype=dtype, symmetric=self.symmetric, granularity="block", block_size=self.block_size)


@register_pass
class WeightOnly(QuantizeDynamic):
    name = "weight-only"
    summary = "Blockwise int4/int8 weights (RTN or GPTQ) lowered to MatMulNBits; activations stay float."
    Options = WeightOnlyOptions

    def run(self, model: ir.Model) -> bool:
        from llmopt.errors import InputError

        self._hessians: dict[str, np.ndarray] = {}
        # lm_head weights a tied embedding table may share: [K, N] shapes of the tables, and the
        # MatMulNBits weights of that shape by content (see _lower and _gather).
        self._table_shapes = {tuple(n.inputs[0].const_value.shape)[::-1] for n in model.graph
                              if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and n.inputs[0] is not None
                              and n.inputs[0].is_initializer() and n.inputs[0].const_value is not None}
        self._shareable: dict[bytes, ir.Value] = {}
        if self.options.method in ("gptq", "auto"):
            try:
                self._calibrate(model)
            except InputError as exc:
                if self.options.method == "gptq":
                    raise
                self.warn(f"no calibration data ({exc}); rounded to nearest instead of GPTQ")
        return super().run(model)

    def _calibrate(self, model: ir.Model) -> None:

        from llmopt.ort import calibration

        inputs = sorted({n.inputs[0].name for n in model.graph if is_matmul(n)
                         and n.inputs[0] is not None and self._constant_weight(n.inputs[1])})
        batches = calibration.model_batches(model, self.options.calibration, self.options.seq_len, self.options.samples)
        obs = calibration.collect(model, inputs, batches, lambda _: [calibration.Gram()])
        self._hessians = {name: o[0].xtx for name, o in obs.items()}
        self.count("calibration_sequences", len(batches))

    def _lower(self, node: ir.Node, a: ir.Value, w: np.ndarray, bias: ir.Value | None, alpha: float, base: str) -> ir.Node:
        o = self.options
        k, n = w.shape
        h = self._hessians.get(a.name)
        method = "gptq" if h is not None else "rtn"
        if h is not None:
            q, scale, zero = gptq(w, h, o.spec, o.damp)
        else:
            q, scale, zero = quantize_blocks(w, o.spec)
        self.count(method)
        self._record_error(base, block_error(w, q, scale, zero, o.block_size), o.bits, method, o.block_size, node)
        packed, zp = pack_nbits(q, zero, o.bits, symmetric=o.symmetric)
        del q
        b = self._initializer(f"{base}_q{o.bits}", packed)
        if method == "rtn" and alpha == 1.0 and k % o.block_size == 0 and (k, n) in self._table_shapes:
            self._shareable[_digest(packed, scale, zp)] = b  # a tied embedding table may read it
        inputs = [a, b, self._initializer(f"{base}_scales", (scale * np.float32(alpha)).reshape(-1).astype(np.float32))]
        if zp is not None:
            inputs.append(self._initializer(f"{base}_zero_points", zp))
        if bias is not None:
            inputs += [None] * (4 - len(inputs)) + [None, bias]  # zero points slot, g_idx, then the bias
        return ir.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=f"{node.name or 'matmul'}_q{o.bits}",
                       attributes={"K": k, "N": n, "bits": o.bits, "block_size": o.block_size,
                                   "accuracy_level": o.accuracy_level})

    def _gather(self, node: ir.Node) -> bool:
        """``Gather(E, ids)`` → ``GatherBlockQuantized`` (blocks along the hidden axis, round to nearest)."""
        o = self.options
        if o.gather_kernel == "rows":
            return super()._gather(node)
        weight = self._embedding_table(node)
        if weight is None:
            return False
        v, h = weight.const_value.shape
        if h * o.bits % 8:
            self.count("skipped.gather_odd_hidden")
            return False
        ids, out = node.inputs[1], node.outputs[0]
        table = weight.const_value.numpy()  # one tensor, memory-mapped
        q, scale, zero = quantize_blocks(table.T, o.spec)  # blocks of each row: [V, n_blocks, block]
        self._record_error(weight.name, block_error(table.T, q, scale, zero, o.block_size), o.bits, "rtn",
                           o.block_size, node)
        del table
        nb = q.shape[1]
        packed, zp = pack_nbits(q.reshape(v, -1)[:, :h], zero, o.bits, symmetric=o.symmetric)  # [V, H*bits/8]
        del q
        shared = None
        if h % o.block_size == 0 and ids.shape is not None:
            shared = self._shareable.get(_digest(packed, scale, zp))
        base = weight.name or "embedding"
        attrs = {"gather_axis": 0, "block_size": o.block_size, "bits": o.bits}
        if shared is None:  # its own table
            inputs = [self._initializer(f"{base}_gq{o.bits}", packed), ids,
                      self._initializer(f"{base}_gather_scales", scale.astype(np.float32))]
            if zp is not None:
                inputs.append(self._initializer(f"{base}_gather_zero_points", zp))
            gbq = ir.node("GatherBlockQuantized", inputs, domain=MS_DOMAIN, name=f"{node.name or 'gather'}_q{o.bits}",
                          attributes={**attrs, "quantize_axis": 1})
            new = [gbq]
        else:  # the lm_head's MatMulNBits weight [V, n_blocks, block*bits/8]: one block per innermost row
            inputs = [shared, ids, self._initializer(f"{base}_gather_scales", scale.reshape(v, nb, 1).astype(np.float32))]
            if zp is not None:  # one zero point a byte along the (single-block) quantize axis
                inputs.append(self._initializer(f"{base}_gather_zero_points", zero.astype(np.uint8).reshape(v, nb, 1)))
            gbq = ir.node("GatherBlockQuantized", inputs, domain=MS_DOMAIN, name=f"{node.name or 'gather'}_q{o.bits}",
                          attributes={**attrs, "quantize_axis": 2})
            shape = self._initializer(f"{base}_gather_shape", np.array([0] * len(ids.shape) + [h], np.int64))
            new = [gbq, ir.node("Reshape", [gbq.outputs[0], shape], name=f"{node.name or 'gather'}_rows")]
            self.count("gather_shared")
        new[-1].outputs[0].shape, new[-1].outputs[0].type = out.shape, out.type
        self._graph.insert_before(node, new)
        graph_util.replace_value(out, new[-1].outputs[0])
        self._graph.remove(node, safe=True)
        self.count("gather")
        return True


def _digest(packed: np.ndarray, scale: np.ndarray, zp: np.ndarray | None) -> bytes:
    """Content key of a quantized table: equal keys ⇔ equal MatMulNBits bytes (data, scales, zero points)."""
    h = hashlib.sha256()
    for a in (packed, np.asarray(scale, np.float32), zp):
        if a is not None:
            h.update(str(a.size).encode())
            h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.digest()


def quantize_blocks(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest: integers [N, n_blocks, block], scales and zero points [N, n_blocks]."""
    b = blocks(w, spec.block_size)
    scale, zero = spec.scale_zero_point(b.min(axis=-1), b.max(axis=-1))
    q = spec.quantize(b, scale[..., None], zero[..., None])
    return q, scale, zero


def gptq(w: np.ndarray, xtx: np.ndarray, spec: QuantSpec, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ over ``w`` [K, N] with input Hessian ``xtx`` [K, K]; block scales set from the
    error-updated weights when each block starts (the "static groups" off variant)."""
    k, n = w.shape
    bs = spec.block_size
    W = w.T.astype(np.float64).copy()  # [N, K]: rows are output channels, columns input rows of w
    H = xtx.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular
    nb = -(-k // bs)
    q = np.zeros((n, nb * bs), dtype=np.int32)
    scale = np.ones((n, nb), dtype=np.float32)
    zero = np.zeros((n, nb), dtype=np.int32)
    for j0 in range(0, k, bs):
        j1 = min(j0 + bs, k)
        b = j0 // bs
        s, z = spec.scale_zero_point(W[:, j0:j1].min(axis=1), W[:, j0:j1].max(axis=1))
        scale[:, b], zero[:, b] = s, z
        for j in range(j0, j1):
            qj = spec.quantize(W[:, j], s, z)
            dq = (qj - z) * s.astype(np.float64)
            q[:, j] = qj
            err = (W[:, j] - dq) / Hinv[j, j]
            W[:, j + 1:] -= np.outer(err, Hinv[j, j + 1:])
    if k % bs:  # padding rows quantize to the zero point
        q[:, k:] = zero[:, -1:]
    return q.reshape(n, nb, bs), scale, zero


def pack_nbits(q: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """MatMulNBits layout: B uint8 [N, n_blocks, block*bits/8] (low nibble first for 4 bits);
    zero points uint8 [N, ceil(n_blocks*bits/8)], or None when symmetric (the kernel's default
    zero point, 2^(bits-1), is what ``QuantSpec`` uses for symmetric unsigned types)."""
    q = q.astype(np.uint8)
    if bits == 4:
        packed = (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)
    else:
        packed = q
    if symmetric:
        return np.ascontiguousarray(packed), None
    z = zero.astype(np.uint8)
    if bits == 4:
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
        z = (z[:, 0::2] & 0x0F) | ((z[:, 1::2] & 0x0F) << 4)
    return np.ascontiguousarray(packed), np.ascontiguousarray(z)

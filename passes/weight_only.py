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

Each block's scale (and zero point) comes from its min/max, or with ``scales=search`` from the
range among 13 clipped ones (1.0 down to 0.7 of it) whose rounding error, weighted by the input
channels' mean square where calibration ran (GPTQ's Hessian diagonal), is least — GPTQ's ``mse``
option, AWQ's clip search. ``table_bits`` / ``head_bits`` give embedding tables / the lm_head (the
node ``llmopt.core.graph_util.lm_head`` finds) their own bits, symmetric blocks of
``wide_block_size``: tables cost no decode time at 8 bits (a step reads one row per token). A tied
table whose lm_head it shares bytes with keeps the head's spec, so one copy is stored.
cpu-int4 runs GPTQ with the search and 8-bit tables (docs/benchmarks.md, "int4: methods compared").
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import numpy as np
import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass
from llmopt.errors import InputError, PipelineError
from llmopt.quant import lower
from llmopt.quant.edit import QuantEdit
from llmopt.quant.sites import embedding_table, linear_sites
from llmopt.quant.spec import QuantSpec
from llmopt.quant.tensor import quantize


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
    scales: Literal["minmax", "search"] = option("minmax", "minmax: each block's range | search: the clipped range (13 fractions of it tried) with the least squared error, weighted by the input's mean square where calibration ran")
    gather: bool = option(True, "quantize embedding tables read by Gather")
    table_bits: int = option(0, "bits of embedding tables (0: bits); 8 costs no decode time (a step reads one row per token) and buys most of int4's lost accuracy per byte")
    head_bits: int = option(0, "bits of the lm_head (0: bits); llama.cpp keeps its output tensor at 6 bits")
    wide_block_size: int = option(128, "block_size of tables and lm_head quantized by table_bits / head_bits (symmetric)")
    gather_kernel: Literal["block", "rows"] = option("block", "block: GatherBlockQuantized with bits, block_size and symmetric as for MatMuls (a tied lm_head's table shared) | rows: int8 rows with a scale each, standard ops for any execution provider")
    min_elements: int = option(4096, "leave weights with fewer elements in float")
    exclude: tuple[str, ...] = option((), "node or weight name patterns to leave in float (fnmatch, ';'-separated)")

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise PipelineError(f"weight-only: bits must be 4 or 8, got {self.bits}")
        if self.method not in ("rtn", "gptq", "auto"):
            raise PipelineError(f"weight-only: method must be rtn, gptq or auto, got {self.method!r}")
        if not 0 <= self.accuracy_level <= 4:
            raise PipelineError(f"weight-only: accuracy_level must be 0..4, got {self.accuracy_level}")
        for key in ("table_bits", "head_bits"):
            if getattr(self, key) not in (0, 4, 8):
                raise PipelineError(f"weight-only: {key} must be 0 (same as bits), 4 or 8, got {getattr(self, key)}")
        if self.scales not in ("minmax", "search"):
            raise PipelineError(f"weight-only: scales must be minmax or search, got {self.scales!r}")
        if self.gather_kernel not in ("block", "rows"):
            raise PipelineError(f"weight-only: gather_kernel must be block or rows, got {self.gather_kernel!r}")
        self.spec, self.wide_spec(8)  # validate the block sizes

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(dtype=f"uint{self.bits}", symmetric=self.symmetric, granularity="block", block_size=self.block_size)

    def wide_spec(self, bits: int) -> QuantSpec:
        """The spec of a table or lm_head given ``bits`` by table_bits / head_bits (0: the pass's spec)."""
        if not bits or bits == self.bits:
            return self.spec
        return QuantSpec(dtype=f"uint{bits}", symmetric=True, granularity="block", block_size=self.wide_block_size)


@register_pass
class WeightOnly(Pass):
    name = "weight-only"
    summary = "Blockwise int4/int8 weights (RTN or GPTQ) lowered to MatMulNBits; activations stay float."
    Options = WeightOnlyOptions

    def run(self, model: ir.Model) -> bool:
        o, edit = self.options, QuantEdit(self, model)
        hessians = self._hessians(model) if o.method in ("gptq", "auto") else {}
        # [K, N] shapes of embedding tables: an lm_head of that shape may hold a tied table's bytes
        found = (embedding_table(node, o.min_elements) for node in model.graph) if o.gather else ()
        tables = {tuple(t.const_value.shape)[::-1] for t in found if isinstance(t, ir.Value)}
        shareable: dict[bytes, ir.Value] = {}  # MatMulNBits weights by content (see the docstring)
        shareable_specs: dict[tuple, QuantSpec] = {}  # [V, H] of a table a head may share -> the head's spec
        head = graph_util.lm_head(model.graph) if o.head_bits else None
        for site in edit.linear_sites(o.min_elements, o.exclude):
            w = site.weight_array()
            spec = o.wide_spec(o.head_bits) if site.node is head else o.spec
            if spec != o.spec:
                self.count(f"lm_head_{o.head_bits}bit")
            qt = quantize(w, spec, hessians.get(site.activation.name), o.damp, search=o.scales == "search")
            self.count(qt.method)
            edit.record(site.name, qt, w, site.node)
            bits = spec.bits
            packed = lower.pack_nbits(qt.q, qt.zero, bits, spec.symmetric)
            b = edit.initializer(f"{site.name}_q{bits}", packed[0])
            if qt.method == "rtn" and site.alpha == 1.0 and w.shape[0] % spec.block_size == 0 and w.shape in tables:
                shareable[_digest(packed[0], qt.scale, packed[1])] = b
                shareable_specs[w.shape[::-1]] = spec
            edit.replace_site(site, lower.matmul_nbits(edit, site, qt, o.accuracy_level, packed, b))
        if o.gather:
            for node, table in edit.tables(o.min_elements, o.exclude):
                self._gather(edit, node, table, shareable, shareable_specs)
        return edit.finish()

    def _hessians(self, model: ir.Model) -> dict[str, np.ndarray]:
        """Each MatMul input's ``XᵀX`` over calibration text (GPTQ), or {} with a warning for ``auto``."""
        from llmopt.ort import calibration

        o = self.options
        inputs = sorted({s.activation.name for s in linear_sites(model.graph, o.min_elements, fold_bias=False)
                         if s.activation is not None})
        try:
            obs, sequences = calibration.observe(model, inputs, o, calibration.Gram)
        except InputError as exc:
            if o.method == "gptq":
                raise
            self.warn(f"no calibration data ({exc}); rounded to nearest instead of GPTQ")
            return {}
        self.count("calibration_sequences", sequences)
        return {name: ob.xtx for name, ob in obs.items()}

    def _gather(self, edit: QuantEdit, node: ir.Node, table: ir.Value, shareable: dict, shareable_specs: dict) -> None:
        """``Gather(E, ids)`` → ``GatherBlockQuantized`` (blocks along the hidden axis, round to
        nearest), reading a tied lm_head's weight when its bytes are the same; or int8 rows."""
        o = self.options
        w = table.const_value.numpy()  # one tensor, memory-mapped
        if o.gather_kernel == "rows":
            qt = quantize(w, QuantSpec("int8", granularity="channel", axis=0))
            edit.record(table.name, qt, w, node)
            edit.replace_node(node, lower.gather_rows(edit, node, table, qt))
        else:
            v, h = w.shape
            # a tied lm_head's bytes are shared when the table quantizes to them (same spec, rtn);
            # otherwise the table gets its own spec (table_bits)
            tied_spec = shareable_specs.get(tuple(w.shape))
            specs = ([tied_spec] if tied_spec is not None else []) + [o.wide_spec(o.table_bits)]
            for spec in specs:
                bits = spec.bits
                if h * bits % 8:
                    self.count("skipped.gather_odd_hidden")
                    return
                qt = quantize(w.T, spec, search=o.scales == "search")  # blocks of each row: [V, n_blocks, block]
                packed = lower.pack_nbits(qt.q.reshape(v, -1)[:, :h], qt.zero, bits, spec.symmetric)  # [V, H*bits/8]
                shared = None
                if h % spec.block_size == 0 and node.inputs[1].shape is not None:
                    shared = shareable.get(_digest(packed[0], qt.scale, packed[1]))
                if shared is not None or spec is specs[-1]:
                    break
            edit.record(table.name, qt, w.T, node)
            edit.replace_node(node, lower.gather_block_quantized(edit, node, table, qt, packed, shared))
            if shared is not None:
                self.count("gather_shared")
            elif spec != o.spec:
                self.count(f"gather_{bits}bit")
        self.count("gather")


def _digest(packed: np.ndarray, scale: np.ndarray, zp: np.ndarray | None) -> bytes:
    """Content key of a quantized table: equal keys ⇔ equal MatMulNBits bytes (data, scales, zero points)."""
    h = hashlib.sha256()
    for a in (packed, np.asarray(scale, np.float32), zp):
        if a is not None:
            h.update(str(a.size).encode())
            h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.digest()

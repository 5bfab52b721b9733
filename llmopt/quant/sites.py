"""Where weights are: the one finder of "a MatMul with a constant weight" that every quantizing,
pruning and smoothing pass uses (``LinearSite``), and of embedding tables read by ``Gather``.

A linear site is ``MatMul(x, W)``, ``MatMul(x, Transpose(W))``, ``Gemm(x, W[, b])`` (``transB``,
``alpha``) or the fuse pass's ``com.microsoft::FusedMatMul(x, W)`` (``transB``, ``alpha``; a tied
lm_head after ``fuse``), with ``W`` a 2-D float initializer, optionally followed by a bias ``Add``
of a constant ``[N]`` vector that a kernel can take as its bias input. Skips come back as a
counter name (``"skipped.gemm_attrs"``, ``"excluded"``…) so passes report why a weight stayed.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_DEFAULT = ("", "ai.onnx")


@dataclasses.dataclass
class LinearSite:
    """``output = activation @ (alpha * W[K, N]) + bias`` computed by ``node`` (and ``bias_add``)."""

    node: ir.Node
    activation: ir.Value
    weight: ir.Value  # the float initializer (stored [N, K] when ``transposed``)
    transposed: bool = False
    alpha: float = 1.0
    bias: ir.Value | None = None
    bias_add: ir.Node | None = None  # a following Add whose constant is ``bias``

    @property
    def name(self) -> str:
        return self.weight.name or "weight"

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.node).outputs[0]

    def weight_array(self) -> np.ndarray:
        """``W`` as float32 [K, N] (one tensor, memory-mapped until converted)."""
        w = self.weight.const_value.numpy().astype(np.float32, copy=False)
        return w.T if self.transposed else w


def excluded(patterns, *names: str | None) -> bool:
    """Whether any of ``names`` matches one of the fnmatch ``patterns``."""
    return any(n and fnmatch.fnmatchcase(n, pat) for n in names for pat in patterns)


def constant_weight(value: ir.Value | None, min_elements: int = 0, through_transpose: bool = True):
    """``(initializer, transposed)`` for the 2-D float initializer behind ``value`` (directly or
    through ``Transpose(perm=[1, 0])``), or None."""
    if value is None:
        return None
    transposed = False
    producer = value.producer()
    if producer is not None:
        perm = producer.attributes.get("perm")
        if not through_transpose or producer.op_type != "Transpose" or producer.domain not in _DEFAULT:
            return None
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            return None
        value, transposed = producer.inputs[0], True
    if not value.is_initializer() or value.is_graph_input() or value.const_value is None:
        return None
    t = value.const_value
    if t.dtype not in FLOATS or len(t.shape) != 2 or t.shape[0] * t.shape[1] < min_elements:
        return None
    return value, transposed


def is_linear(node: ir.Node) -> bool:
    """MatMul, Gemm, or ``com.microsoft::FusedMatMul``."""
    if node.domain in _DEFAULT:
        return node.op_type in ("MatMul", "Gemm")
    return node.domain == MS_DOMAIN and node.op_type == "FusedMatMul"


def linear_site(node: ir.Node, min_elements: int = 0, exclude=(), *, plain: bool = False,
                fold_bias: bool = True) -> LinearSite | str | None:
    """The site ``node`` computes, a skip counter name, or None when it is not a linear layer.

    ``plain``: only ``MatMul(x, W)`` whose weight nothing else reads, for passes that rewrite the
    weight's values in place (pruning, smoothing)."""
    if not is_linear(node) or (plain and node.op_type != "MatMul"):
        return None
    attrs = {k: v.value for k, v in node.attributes.items()}
    alpha, trans_b = float(attrs.get("alpha", 1.0)), bool(attrs.get("transB", 0))
    if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("beta", 1.0) != 1.0):
        return "skipped.gemm_attrs"
    if node.op_type == "FusedMatMul" and (attrs.get("transA", 0) or attrs.get("transBatchA", 0)
                                          or attrs.get("transBatchB", 0)):
        return "skipped.fused_matmul_attrs"
    found = constant_weight(node.inputs[1], min_elements, through_transpose=not plain)
    if found is None or (plain and len(found[0].uses()) != 1):
        return None
    weight, transposed = found
    site = LinearSite(node, node.inputs[0], weight, transposed ^ trans_b, alpha)
    if excluded(exclude, node.name, weight.name):
        return "excluded"
    n = weight.const_value.shape[0 if site.transposed else 1]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        site.bias = node.inputs[2]
    elif fold_bias and node.op_type != "Gemm":
        site.bias, site.bias_add = _bias_add(node.outputs[0], n)
    if site.bias is not None and (site.bias.const_value is None or list(site.bias.const_value.shape) != [n]):
        return "skipped.bias_shape"
    return site


def linear_sites(graph: ir.Graph, min_elements: int = 0, exclude=(), **kw) -> list[LinearSite]:
    """Every linear site of ``graph`` (``linear_site``'s keywords), skips dropped."""
    found = (linear_site(node, min_elements, exclude, **kw) for node in graph)
    return [s for s in found if isinstance(s, LinearSite)]


def _bias_add(out: ir.Value, n: int) -> tuple[ir.Value | None, ir.Node | None]:
    """A single ``Add`` of a constant float32 ``[n]`` right after ``out``: a kernel's bias input."""
    if len(out.uses()) != 1 or out.is_graph_output():
        return None, None
    use = next(iter(out.uses()))
    cand = use.node
    if cand.op_type != "Add" or cand.domain not in _DEFAULT:
        return None, None
    other = cand.inputs[1 - use.idx]
    ct = other.const_value if other is not None and other.is_initializer() else None
    if ct is not None and ct.dtype == ir.DataType.FLOAT and list(ct.shape) == [n]:
        return other, cand
    return None, None


def embedding_table(node: ir.Node, min_elements: int = 0, exclude=()) -> ir.Value | str | None:
    """The constant float32 table [V, H] a ``Gather(axis=0)`` reads, a skip counter name, or None."""
    if node.op_type != "Gather" or node.domain not in _DEFAULT:
        return None
    axis = node.attributes.get("axis")
    if axis is not None and axis.as_int() != 0:
        return None
    found = constant_weight(node.inputs[0], min_elements)
    if found is None or found[1]:
        return None
    if found[0].const_value.dtype != ir.DataType.FLOAT:
        return "skipped.non_fp32_table"
    if excluded(exclude, node.name, found[0].name):
        return "excluded"
    return found[0]

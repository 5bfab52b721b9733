"""The graph side of a quantizing pass: walking the sites, naming new initializers, swapping a
site for its lowered nodes, recording errors, and cleaning up at the end. A pass holds one
``QuantEdit`` per run and only chooses specs and kernels."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.quant.error import ErrorLog
from llmopt.quant.sites import MS_DOMAIN, LinearSite, embedding_table, linear_site
from llmopt.quant.tensor import QTensor


class QuantEdit:
    def __init__(self, pass_, model: ir.Model):
        self.pass_, self.model, self.graph = pass_, model, model.graph
        self.names = {v.name for v in _all_values(model.graph)}
        self.errors = ErrorLog(pass_.name)
        self.modified = False

    # -- walking -----------------------------------------------------------------

    def linear_sites(self, min_elements: int, exclude) -> Iterator[LinearSite]:
        """Each quantizable linear site (float32 activation), skips counted on the pass."""
        for node in list(self.graph):
            site = linear_site(node, min_elements, exclude)
            if isinstance(site, LinearSite) and site.activation is not None and site.activation.dtype not in (None, ir.DataType.FLOAT):
                site = "skipped.non_fp32_activation"
            if isinstance(site, LinearSite) and _routes_experts(site.output):
                site = "skipped.router"  # tiny, and its errors change which experts run (docs/guide.md)
            if isinstance(site, str):
                self.pass_.count(site)
            elif site is not None:
                yield site

    def tables(self, min_elements: int, exclude) -> Iterator[tuple[ir.Node, ir.Value]]:
        """Each ``Gather`` of a constant float32 embedding table, as ``(node, table)``."""
        for node in list(self.graph):
            table = embedding_table(node, min_elements, exclude)
            if isinstance(table, str):
                self.pass_.count(table)
            elif table is not None:
                yield node, table

    # -- building ----------------------------------------------------------------

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def record(self, name: str, qt: QTensor, w: np.ndarray, node: ir.Node | None) -> None:
        """The quantization error of ``qt`` against the float ``w`` it came from."""
        block = qt.spec.block_size if qt.spec.granularity == "block" else None
        self.errors.record(name, qt.error(w), qt.spec.bits, qt.method, block, node)

    def replace_site(self, site: LinearSite, nodes: list[ir.Node]) -> None:
        """``nodes`` (the last gives the result) in place of the site's node and bias Add."""
        self._swap(site.node, site.output, nodes, [site.node] + ([site.bias_add] if site.bias_add else []))
        self.pass_.count("matmul")
        if site.bias is not None:
            self.pass_.count("bias_folded")

    def replace_node(self, node: ir.Node, nodes: list[ir.Node]) -> None:
        self._swap(node, node.outputs[0], nodes, [node])

    def _swap(self, at: ir.Node, out: ir.Value, nodes: list[ir.Node], old: list[ir.Node]) -> None:
        nodes[-1].outputs[0].shape, nodes[-1].outputs[0].type = out.shape, out.type
        self.graph.insert_before(at, nodes)
        graph_util.replace_value(out, nodes[-1].outputs[0])
        for n in reversed(old):
            self.graph.remove(n, safe=True)
        self.modified = True

    def finish(self) -> bool:
        """Dead weight Transposes and float weights nothing reads dropped, errors written; whether
        the model changed."""
        if not self.modified:
            return False
        if not any(d == MS_DOMAIN for d in self.model.opset_imports):
            self.model.opset_imports[MS_DOMAIN] = 1
        for node in list(self.graph):
            if node.op_type == "Transpose" and all(not o.uses() and not o.is_graph_output() for o in node.outputs):
                self.graph.remove(node, safe=True)
        graph_util.drop_unused_initializers(self.graph)
        self.errors.write(self.model, self.pass_.warn)
        return True


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph.all_nodes():
        yield from node.outputs


_ROUTING_STOPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "DynamicQuantizeMatMul", "GroupQueryAttention",
                  "MultiHeadAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                  "LayerNormalization", "SkipLayerNormalization"}


def _routes_experts(value: ir.Value, limit: int = 64) -> bool:
    """Whether ``value`` is a mixture-of-experts router's logits: through routing arithmetic only (no
    other linear, norm or attention on the way) it reaches a ``MoE`` / ``QMoE`` router input."""
    seen: set[int] = set()
    todo = [value]
    while todo and len(seen) < limit:
        for user, slot in todo.pop().uses():
            if user.domain == MS_DOMAIN and user.op_type in ("MoE", "QMoE"):
                if slot == 1:
                    return True
                continue
            if user.op_type in _ROUTING_STOPS or id(user) in seen:
                continue
            seen.add(id(user))
            todo.extend(user.outputs)
    return False

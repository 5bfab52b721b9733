"""Graph facts and small edits on an ``onnx_ir`` model: statistics read from metadata (never
tensor bytes), the signature, value replacement, initializers, and shapes known from the graph."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir


def tensor_numel(value: ir.Value) -> int:
    shape = value.shape if value.shape is not None else value.const_value.shape
    n = 1
    for d in shape:
        n *= int(d)
    return n


def parameter_stats(model: ir.Model) -> dict[str, dict[str, int]]:
    """Parameter count and bytes per dtype, from initializer metadata only."""
    stats: dict[str, dict[str, int]] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        n = 1
        for d in tensor.shape:
            n *= int(d)
        entry = stats.setdefault(tensor.dtype.name.lower(), {"count": 0, "bytes": 0})
        entry["count"] += n
        entry["bytes"] += tensor.nbytes
    return stats


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def op_histogram(model: ir.Model) -> dict[str, int]:
    counts = Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type) for n in model.graph.all_nodes()
    )
    return dict(counts.most_common())


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def dim_str(d) -> str | int:
    return int(d) if isinstance(d, int) else str(d)


def io_signature(model: ir.Model) -> dict[str, list[dict]]:
    def describe(v: ir.Value) -> dict:
        return {
            "name": v.name,
            "dtype": v.dtype.name.lower() if v.dtype is not None else None,
            "shape": [dim_str(d) for d in v.shape] if v.shape is not None else None,
        }

    return {
        "inputs": [describe(v) for v in model.graph.inputs],
        "outputs": [describe(v) for v in model.graph.outputs],
    }


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` at ``new``; a graph output keeps its name (names are the interface)."""
    was_output, name = old.is_graph_output(), old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        old.name = None
        new.name = name


def drop_unused_initializers(graph: ir.Graph) -> int:
    """Remove initializers nothing reads (the originals a pass replaced); returns how many."""
    dead = [name for name, v in graph.initializers.items()
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input()]
    for name in dead:
        del graph.initializers[name]
    return len(dead)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name`` (suffixed ``_1``, ``_2``, ... if the name is taken)."""
    taken = set(graph.initializers) | {v.name for v in graph.inputs} | {v.name for n in graph for v in n.outputs}
    base, i = name, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def gqa_head_dim(node: ir.Node) -> int | None:
    """A GroupQueryAttention's head size, from its query width (packed Q/K/V, or Q alone)."""
    heads, kv_heads = node.attributes["num_heads"].as_int(), node.attributes["kv_num_heads"].as_int()
    dims = known_shape(node.inputs[0]) if node.inputs[0] is not None else None
    width = dims[-1] if dims else None
    if not isinstance(width, int):
        return None
    return width // (heads + 2 * kv_heads) if len(node.inputs) < 2 or node.inputs[1] is None else width // heads


_SAME_SHAPE = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
               "SkipLayerNormalization", "RotaryEmbedding", "Identity", "Cast"}


def known_shape(v: ir.Value, depth: int = 6) -> list | None:
    """``v``'s dims (ints where known), from its shape or, when shape inference left none (outputs of
    contrib ops and of rewrites), through shape-preserving ops and a Reshape to a constant shape."""
    if v.shape is not None:
        return list(v.shape)
    node = v.producer()
    if node is None or depth == 0 or not node.inputs or node.inputs[0] is None:
        return None
    if node.op_type in _SAME_SHAPE and v is node.outputs[0]:
        return known_shape(node.inputs[0], depth - 1)
    if node.op_type == "Reshape" and len(node.inputs) > 1 and node.inputs[1] is not None \
            and node.inputs[1].const_value is not None:
        src = known_shape(node.inputs[0], depth - 1)
        target = [int(d) for d in node.inputs[1].const_value.numpy().reshape(-1)]
        if src is None or target.count(-1) > 1:
            return None
        dims = [src[i] if d == 0 and i < len(src) else d for i, d in enumerate(target)]
        if -1 in dims:  # the dims after the copied/fixed ones fold into -1
            i = dims.index(-1)
            rest = src[i:] if all(d == 0 for d in target[:i]) and i == len(target) - 1 else None
            dims[i] = int(np.prod(rest)) if rest and all(isinstance(d, int) for d in rest) else None
        return dims
    return None


def cache_dims(past: ir.Value) -> tuple[int, int] | None:
    """(kv_heads, head_dim) of a past-KV input: from its shape when fixed, else from the
    GroupQueryAttention that reads it (onnxruntime-genai's builder leaves ``head_size`` symbolic)."""
    shape = past.shape
    if shape is not None and len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[3], int):
        return int(shape[1]), int(shape[3])
    for use in past.uses():
        node = use.node
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and use.idx in (3, 4):
            head_dim = gqa_head_dim(node)
            if head_dim is not None:
                return node.attributes["kv_num_heads"].as_int(), head_dim
    return None


_LM_HEAD_LINEAR = {("", "MatMul"), ("", "Gemm"), ("com.microsoft", "FusedMatMul"), ("com.microsoft", "MatMulNBits")}
_LM_HEAD_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Softcap", "Identity"}


def lm_head(graph: ir.Graph) -> ir.Node | None:
    """The linear node whose output reaches ``logits`` through element-wise ops only, or None."""
    out = next((v for v in graph.outputs if v.name == "logits"), None)
    node = out.producer() if out is not None else None
    while node is not None:
        if (node.domain if node.domain != "ai.onnx" else "", node.op_type) in _LM_HEAD_LINEAR:
            w = node.inputs[1] if len(node.inputs) > 1 else None
            x = node.inputs[0]
            if w is None or w.const_value is None or x is None or x.shape is None or len(x.shape) != 3:
                return None
            return node
        if node.op_type not in _LM_HEAD_ELEMENTWISE:
            return None
        # follow the one non-constant input
        varying = [v for v in node.inputs if v is not None and v.const_value is None]
        if len(varying) != 1:
            return None
        node = varying[0].producer()
    return None

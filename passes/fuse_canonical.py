"""Canonical input form: idioms other exporters write, rewritten to the form the fusion rules expect.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, which Hugging Face Optimum uses)
spells the same computation differently from the dynamo exporter the fusion rules were written
against. Each rewrite here computes exactly what it replaces (the ``fuse`` pass's numerical guard
checks that too):

- ``reciprocal_div``: ``Div(1, x)`` → ``Reciprocal(x)`` (TorchScript's ``rsqrt``).
- ``reshape_dims_from_shape``: a ``Reshape`` whose target shape is assembled at run time from the
  dims of a tensor (``Concat(Unsqueeze(Gather(Shape(t), i)), …, -1, 16)``) → a constant shape that
  copies those dims (``[0, 0, -1, 16]``) where the symbolic shapes prove they are the same dims.
  Shape inference then sees static head counts, which the attention rules need.
- ``static_dims``: ``Gather(Shape(x), i)`` of a dim the shapes know → a constant (TorchScript
  computes ``head_dim / 2`` that way for rotary's halves), and ``ReduceMean``'s default
  ``noop_with_empty_axes=0`` written out, as the norm rules match it.
- ``expand_shape``: TorchScript's ``expand`` idiom ``Where(Equal(c, -1), 1, c)`` (a -1 in the
  target shape keeps the input's dim) → ``c`` itself where no entry of ``c`` can be -1 (dims read
  with ``Shape`` and constants); ``repeat_kv``'s Expand/Reshape then get shapes by inference.
- ``scalar_where``: a ``Where`` choosing between one-element constants (``[0.0]``, ``[-inf]``)
  → scalars, as the rules match them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from llmopt.core import graph_util


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.const_value is None:
        return None
    try:
        return v.const_value.numpy()
    except Exception:  # noqa: BLE001 - an unreadable constant is simply not matched
        return None


def _is_default(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


class ReciprocalDiv(pattern.RewriteRuleClassBase):
    """``Div(1, x)`` → ``Reciprocal(x)``."""

    def pattern(self, op, one, x):
        return op.Div(one, x)

    def check(self, context, one, x, **_):
        c = _const(one)
        rank_ok = c is not None and (c.ndim == 0 or (x.shape is not None and c.ndim <= len(x.shape)))
        return rank_ok and c.size == 1 and float(c.reshape(())) == 1.0

    def rewrite(self, op, x, **_):
        return op.Reciprocal(x)


def _dim_source(v: ir.Value) -> tuple[ir.Value, int] | None:
    """``v`` is a one-element int64 piece ``Unsqueeze(Gather(Shape(t), i), [0])`` (or
    ``Shape(t, start=i, end=i+1)``): (t, i)."""
    node = v.producer()
    if node is None or not _is_default(node):
        return None
    if node.op_type == "Shape":
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        t = node.inputs[0]
        if t is None or t.shape is None:
            return None
        rank = len(t.shape)
        start = start + rank if start < 0 else start
        end = rank if end is None else (end + rank if end < 0 else end)
        return (t, start) if end - start == 1 else None
    if node.op_type != "Unsqueeze" or len(node.inputs) < 2 or _const(node.inputs[1]) is None:
        return None
    if _const(node.inputs[1]).reshape(-1).tolist() != [0]:
        return None
    gather = node.inputs[0].producer() if node.inputs[0] is not None else None
    if gather is None or gather.op_type != "Gather" or not _is_default(gather) or gather.attributes.get_int("axis", 0) != 0:
        return None
    idx = _const(gather.inputs[1])
    shape_node = gather.inputs[0].producer() if gather.inputs[0] is not None else None
    if idx is None or idx.size != 1 or shape_node is None or shape_node.op_type != "Shape" or not _is_default(shape_node):
        return None
    if shape_node.attributes.get_int("start", 0) != 0 or shape_node.attributes.get("end") is not None:
        return None
    t = shape_node.inputs[0]
    if t is None or t.shape is None:
        return None
    i = int(idx.reshape(()))
    return (t, i + len(t.shape) if i < 0 else i)


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def reshape_dims_from_shape(model: ir.Model) -> int:
    """Reshapes to a run-time assembled shape → a constant shape copying dims (0) where proven."""
    import onnx_ir.passes.common as common_passes

    common_passes.ShapeInferencePass()(model)  # the proof reads symbolic shapes
    graph = model.graph
    n = 0
    for node in list(graph):
        if node.op_type != "Reshape" or not _is_default(node) or node.attributes.get_int("allowzero", 0) != 0:
            continue
        x, shape = node.inputs[0], node.inputs[1]
        concat = shape.producer() if shape is not None else None
        if x is None or x.shape is None or concat is None or concat.op_type != "Concat" or not _is_default(concat):
            continue
        dims: list[int] = []
        for k, piece in enumerate(concat.inputs):
            c = _const(piece)
            if c is not None:
                if c.size != 1:
                    dims = []
                    break
                dims.append(int(c.reshape(())))
                continue
            src = _dim_source(piece) if piece is not None else None
            if src is None:
                dims = []
                break
            t, i = src
            if i >= len(t.shape):
                dims = []
                break
            if isinstance(t.shape[i], int):
                dims.append(int(t.shape[i]))
            elif k < len(x.shape) and _same_dim(x.shape[k], t.shape[i]):
                dims.append(0)  # Reshape copies dim k of its input: the same dim, by the shapes
            else:
                dims = []
                break
        if not dims or dims.count(-1) > 1 or len(dims) != len(concat.inputs):
            continue
        const = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(dims, dtype=np.int64))},
                        name=f"{node.name}_shape")
        graph.insert_before(node, const)
        node.replace_input_with(1, const.outputs[0])
        n += 1
    return n


def static_dims(model: ir.Model) -> int:
    """``Gather(Shape(x), i)`` (scalar ``i``) where ``x.shape[i]`` is a known int → that int."""
    n = 0
    for node in list(model.graph):
        if node.op_type == "ReduceMean" and _is_default(node) and "noop_with_empty_axes" not in node.attributes \
                and len(node.inputs) > 1:
            node.attributes["noop_with_empty_axes"] = ir.AttrInt64("noop_with_empty_axes", 0)  # the default
            n += 1
        if node.op_type == "Range" and _is_default(node):
            n += _name_range_length(node)
            continue
        if node.op_type != "Gather" or not _is_default(node) or node.attributes.get_int("axis", 0) != 0:
            continue
        shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
        idx = _const(node.inputs[1])
        if shape_node is None or shape_node.op_type != "Shape" or not _is_default(shape_node) or idx is None or idx.ndim != 0:
            continue
        x = shape_node.inputs[0]
        if x is None or x.shape is None or shape_node.attributes.get_int("start", 0) != 0 \
                or shape_node.attributes.get("end") is not None:
            continue
        i = int(idx)
        i = i + len(x.shape) if i < 0 else i
        if not 0 <= i < len(x.shape) or not isinstance(x.shape[i], int):
            continue
        const = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(x.shape[i], dtype=np.int64))},
                        name=f"{node.name}_static")
        model.graph.insert_before(node, const)
        graph_util.replace_value(node.outputs[0], const.outputs[0])
        n += 1
    return n


def _name_range_length(node: ir.Node) -> int:
    """``Range(0, Gather(Shape(x), i), 1)`` has length ``x.shape[i]``: say so in its shape (shape
    inference cannot), so the positions it makes broadcast against ``x``'s dim by name."""
    start, delta = _const(node.inputs[0]), _const(node.inputs[2])
    limit = node.inputs[1]
    if start is None or delta is None or start.size != 1 or delta.size != 1 or limit is None:
        return 0
    if int(start.reshape(())) != 0 or int(delta.reshape(())) != 1:
        return 0
    gather = limit.producer()
    if gather is None or gather.op_type != "Gather" or _const(gather.inputs[1]) is None:
        return 0
    shape_node = gather.inputs[0].producer() if gather.inputs[0] is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.attributes.get_int("start", 0) != 0:
        return 0
    x, i = shape_node.inputs[0], int(_const(gather.inputs[1]).reshape(()))
    if x is None or x.shape is None or not -len(x.shape) <= i < len(x.shape):
        return 0
    dim = x.shape[i]
    out = node.outputs[0]
    if out.shape is not None and len(out.shape) == 1 and _same_dim(out.shape[0], dim):
        return 0
    out.shape = ir.Shape([dim])
    return 1


def reinfer_shapes(model: ir.Model) -> int:
    """Shape inference again, forgetting the intermediate shapes it could not name before (``unk__``
    dims: exporter placeholders the rewrites above may now resolve)."""
    import onnx_ir.passes.common as common_passes

    outputs = {id(v) for v in model.graph.outputs}
    for node in model.graph:
        for v in node.outputs:
            if id(v) not in outputs and v.shape is not None and any(
                    not isinstance(d, int) and (d.value is None or str(d.value).startswith("unk__")) for d in v.shape):
                v.shape = None
    common_passes.ShapeInferencePass()(model)
    return 0


def rotary_shapes(model: ir.Model) -> int:
    """A ``RotaryEmbedding``'s output has its input's shape (ONNX shape inference does not know the
    contrib op, so the value keeps the shape of the subgraph it replaced, which may be a stale
    ``unk__`` guess); set it, then infer shapes downstream again."""
    for node in model.graph:
        if node.op_type == "RotaryEmbedding" and node.domain == "com.microsoft" and node.inputs[0] is not None \
                and node.inputs[0].shape is not None:
            node.outputs[0].shape = ir.Shape(list(node.inputs[0].shape))
    return reinfer_shapes(model)


def _small_value(v: ir.Value | None, depth: int = 3) -> np.ndarray | None:
    """A small int tensor: a constant, a ``ConstantOfShape`` of a constant shape, or a ``Mul`` of those."""
    c = _const(v)
    if c is not None or v is None or depth == 0:
        return c
    node = v.producer()
    if node is None or not _is_default(node):
        return None
    if node.op_type == "ConstantOfShape":
        shape = _const(node.inputs[0])
        fill = node.attributes.get("value")
        value = fill.value.numpy().reshape(-1)[0] if fill is not None else np.float32(0)
        return None if shape is None or shape.size > 1 or int(shape.reshape(-1)[0]) > 16 else \
            np.full(shape.astype(np.int64), value)
    if node.op_type == "Mul":
        a, b = _small_value(node.inputs[0], depth - 1), _small_value(node.inputs[1], depth - 1)
        return None if a is None or b is None else a * b
    return None


def _shape_concat(c: ir.Value) -> ir.Node | None:
    """The ``Concat`` of one-element dims (constants, or dims read with ``Shape``) that ``c`` is,
    looking through TorchScript's ``Reshape(concat, [-1])`` (or the Identity it became); None otherwise."""
    node = c.producer()
    while node is not None and _is_default(node) and (node.op_type == "Identity" or node.op_type == "Reshape" and (
            _const(node.inputs[1]) is not None and _const(node.inputs[1]).reshape(-1).tolist() == [-1])):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type != "Concat" or not _is_default(node):
        return None
    for piece in node.inputs:
        k = _const(piece)
        if (k is None or k.ndim != 1) and (piece is None or _dim_source(piece) is None):
            return None
    return node


def expand_shape(model: ir.Model) -> int:
    """``Where(Equal(c, -1s), 1s, c)`` → ``c`` with its constant -1 entries set to 1 (dims read with
    ``Shape`` are never -1): the same values, in a form shape inference follows."""
    n = 0
    for node in list(model.graph):
        if node.op_type != "Where" or not _is_default(node) or len(node.inputs) != 3:
            continue
        cond, ones, c = node.inputs
        eq = cond.producer() if cond is not None else None
        if eq is None or eq.op_type != "Equal" or c is None or eq.inputs[0] is not c:
            continue
        minus, one = _small_value(eq.inputs[1]), _small_value(ones)
        if minus is None or one is None or not (minus == -1).all() or not (one == 1).all():
            continue
        concat = _shape_concat(c)
        if concat is None or node.outputs[0].is_graph_output():
            continue
        pieces = []
        for i, piece in enumerate(concat.inputs):
            k = _const(piece)
            if k is not None and (k == -1).any():
                fixed = ir.node("Constant", [], attributes={"value": ir.tensor(np.where(k == -1, 1, k).astype(k.dtype))},
                                name=f"{node.name}_dim_{i}")
                model.graph.insert_before(node, fixed)
                piece = fixed.outputs[0]
            pieces.append(piece)
        new = ir.node("Concat", pieces, attributes={"axis": 0}, name=f"{node.name}_shape")
        model.graph.insert_before(node, new)
        graph_util.replace_value(node.outputs[0], new.outputs[0])
        model.graph.remove(node, safe=True)
        n += 1
    return n


def scalar_where(model: ir.Model) -> int:
    """``Where(c, [a], [b])`` with one-element constant branches → scalar branches (same result:
    the condition has at least their rank, so broadcasting is unchanged)."""
    n = 0
    for node in list(model.graph):
        if node.op_type != "Where" or not _is_default(node):
            continue
        cond = node.inputs[0]
        if cond is None or cond.shape is None:
            continue
        for i in (1, 2):
            c = _const(node.inputs[i])
            if c is None or c.size != 1 or c.ndim == 0 or c.ndim > len(cond.shape):
                continue
            scalar = ir.node("Constant", [], attributes={"value": ir.tensor(c.reshape(()))},
                             name=f"{node.name}_scalar_{i}")
            model.graph.insert_before(node, scalar)
            node.replace_input_with(i, scalar.outputs[0])
            n += 1
    return n

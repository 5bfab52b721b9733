"""Change detection for the onnx-graphsurgeon adapter: a model's structure as a comparable value
(``GraphSurgeonPass.run`` reports a change only if it differs after the round trip).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir


def fingerprint(model: ir.Model, refs: dict[int, int]) -> tuple:
    """The model's structure: referenced tensors by identity, small inline ones by content."""
    functions = sorted((_function_fp(f, refs) for f in model.functions.values()), key=repr)
    return (tuple(sorted(model.opset_imports.items())), _graph_fp(model.graph, refs), tuple(functions))


def _graph_fp(graph: ir.Graph, refs: dict[int, int]) -> tuple:
    return (
        graph.name or "",
        tuple(_value_fp(v) for v in graph.inputs),
        tuple(_value_fp(v) for v in graph.outputs),
        tuple(sorted((name, repr(_tensor_fp(v.const_value, refs))) for name, v in graph.initializers.items())),
        tuple(sorted(repr(_node_fp(n, refs)) for n in graph)),
    )


def _function_fp(function: ir.Function, refs: dict[int, int]) -> tuple:
    return (
        function.domain, function.name, function.overload,
        tuple(v.name for v in function.inputs), tuple(v.name for v in function.outputs),
        tuple(sorted(function.attributes)),
        tuple(sorted(repr(_node_fp(n, refs)) for n in function)),
    )


def _value_fp(value: ir.Value | None) -> tuple | None:
    if value is None:
        return None
    shape = None if value.shape is None else tuple(str(d) for d in value.shape)
    return (value.name or "", value.dtype.name if value.dtype is not None else None, shape)


def _node_fp(node: ir.Node, refs: dict[int, int]) -> tuple:
    attrs = sorted((repr(_attr_fp(a, refs)) for a in node.attributes.values()))
    domain = "" if node.domain == "ai.onnx" else node.domain
    return (
        domain, node.op_type, node.overload, node.name or "",
        tuple((v.name or "") if v is not None else "" for v in node.inputs),
        tuple(_value_fp(v) for v in node.outputs),
        tuple(attrs),
    )


def _attr_fp(attr, refs: dict[int, int]) -> tuple:
    if attr.is_ref():
        return (attr.name, "ref", attr.type.name, attr.ref_attr_name)
    t, v = attr.type, attr.value
    if t == ir.AttributeType.TENSOR:
        v = _tensor_fp(v, refs)
    elif t == ir.AttributeType.TENSORS:
        v = tuple(_tensor_fp(x, refs) for x in v)
    elif t == ir.AttributeType.GRAPH:
        v = _graph_fp(v, refs)
    elif t == ir.AttributeType.GRAPHS:
        v = tuple(_graph_fp(g, refs) for g in v)
    elif t == ir.AttributeType.FLOAT:
        v = float(np.float32(v))  # proto floats are float32: compare at that precision
    elif t == ir.AttributeType.FLOATS:
        v = tuple(float(np.float32(x)) for x in v)
    elif isinstance(v, (list, tuple)):
        v = tuple(repr(x) for x in v)
    else:
        v = repr(v)
    return (attr.name, t.name, v)


def _tensor_fp(tensor, refs: dict[int, int]) -> tuple | None:
    if tensor is None:
        return None
    i = refs.get(id(tensor))
    if i is not None:
        return ("ref", i)
    head = (tensor.dtype.name, tuple(int(d) for d in tensor.shape))
    if isinstance(tensor, ir.StringTensor):
        data = b"\0".join(tensor.string_data())
    else:
        try:
            data = tensor.tobytes()
        except Exception:  # noqa: BLE001 - exotic tensors: compare their values
            data = repr(np.asarray(tensor.numpy()).tolist()).encode()
    return ("data", *head, hashlib.sha256(data).hexdigest())

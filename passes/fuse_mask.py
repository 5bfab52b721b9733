"""What an attention mask computes, read from the subgraph that builds it.

``GroupQueryAttention`` replaces the graph's mask by per-row lengths: it attends causally over the
tokens ``attention_mask`` keeps, and over the last ``local_window_size`` positions (the current
one included; tests/test_foreign_exports.py checks it against transformers past a 12-token window)
when that attribute is set. A mask that says more than "causal + padding" must either map onto
those attributes or keep attention unfused. onnxscript's GQA rule means to check this but never does
(it compares a failed ``MatchResult`` with ``None``), so a sliding-window mask fused to a full
causal GroupQueryAttention: right on every sample shorter than the window, wrong after it.

``sliding_window(mask)`` finds the window in the mask's subgraph: a comparison between a key
position and a query position shifted by a constant (``kv > q - W``, ``kv <= q - W``, their mirror
forms; ``Add(q, -W)`` as well as ``Sub(q, W)``), and returns the window ORT takes
(``local_window_size``: the key positions ``q - local_window_size + 1 .. q`` are attended).
"""

from __future__ import annotations

import onnx_ir as ir

_COMPARISONS = {"Greater", "GreaterOrEqual", "Less", "LessOrEqual"}
# positions attended for "kv CMP q - c" are c + this, by comparison, when the shifted query is the
# second input (kv > q - c: q - c + 1 .. q, c of them; kv >= q - c: c + 1; kv < q - c masks below
# q - c: c + 1; kv <= q - c masks up to q - c: c)
_WINDOW_WHEN_SECOND = {"Greater": 0, "GreaterOrEqual": 1, "Less": 1, "LessOrEqual": 0}
# ... and when it is the first ("q - c < kv" is "kv > q - c")
_WINDOW_WHEN_FIRST = {"Less": 0, "LessOrEqual": 1, "Greater": 1, "GreaterOrEqual": 0}
_MAX_NODES = 400  # a mask is built by tens of nodes; stop rather than walk a whole model


class MaskNotUnderstood(Exception):
    """The mask's subgraph has a shift GroupQueryAttention cannot express (several windows, say)."""


def _scalar_int(v: ir.Value | None) -> int | None:
    if v is None or v.const_value is None or v.const_value.size != 1:
        return None
    value = v.const_value.numpy().reshape(())
    return int(value) if value.dtype.kind in "iu" else None


def _shift(v: ir.Value) -> int | None:
    """``c`` when ``v`` is ``x - c`` (``Sub(x, c)`` or ``Add(x, -c)``) for a constant integer c > 0."""
    node = v.producer()
    if node is None or node.op_type not in ("Sub", "Add") or len(node.inputs) != 2:
        return None
    c = _scalar_int(node.inputs[1])
    if c is None and node.op_type == "Add":
        c = _scalar_int(node.inputs[0])
    if c is None:
        return None
    c = c if node.op_type == "Sub" else -c
    return c if c > 0 else None


def _ancestors(value: ir.Value):
    seen: set[int] = set()
    stack = [value.producer()]
    while stack and len(seen) < _MAX_NODES:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(i.producer() for i in node.inputs if i is not None)


def sliding_window(mask: ir.Value | None) -> int | None:
    """The window (``local_window_size``: positions attended, the current one included) ``mask``
    applies, or None when it has none.

    Raises ``MaskNotUnderstood`` when the subgraph shifts positions by different amounts.
    """
    if mask is None:
        return None
    found: set[int] = set()
    for node in _ancestors(mask):
        if node.op_type not in _COMPARISONS or len(node.inputs) != 2:
            continue
        first, second = node.inputs
        if second is not None and (c := _shift(second)) is not None:
            found.add(c + _WINDOW_WHEN_SECOND[node.op_type])
        elif first is not None and (c := _shift(first)) is not None:
            found.add(c + _WINDOW_WHEN_FIRST[node.op_type])
    if len(found) > 1:
        raise MaskNotUnderstood(f"the mask shifts positions by several amounts ({sorted(found)})")
    return found.pop() if found else None

"""llmopt's own rules for the `fuse` pass: rotary embeddings.

- ``RotaryAngles`` (``rotary_angles``): transformers ≥ 5's rotary angles ``Mul(Cast(positions), inv_freq)``
  → the ``MatMul`` form onnxscript's cos/sin-cache rule matches (bit-identical).
- ``rotary_positions_per_row``: a ``RotaryEmbedding`` fed ``[1, S]`` position ids (exports
  without a KV cache) gets them expanded to ``[batch, S]``, which ONNX Runtime's kernel requires.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from llmopt.passes.fuse_common import MS, const_ints


class RotaryAngles(pattern.RewriteRuleClassBase):
    """``Mul(Cast(Unsqueeze(pos, axes)), inv_freq[E])`` → ``Transpose(MatMul(inv_freq[1,E,1], pos[B,1,S]), [0,2,1])``.

    ``pos`` is the ``[B, S]`` position_ids input of an export with a KV cache (axes ``[-1]``), or
    the ``[S]`` Range of an export without one (axes ``[0, -1]``; it becomes ``[1, S]``). The
    product has a contraction of length 1, so the result is bit-identical.
    """

    def pattern(self, op, position_ids, axes, inv_freq):
        return op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)

    def check(self, context, position_ids, axes, inv_freq, **_):
        result = pattern.MatchResult()
        if inv_freq.const_value is None or len(inv_freq.const_value.shape) != 1:
            return result.fail("inv_freq is not a constant 1-D tensor", inv_freq)
        rank = None if position_ids.shape is None else len(position_ids.shape)
        expected = {2: ([-1], [2]), 1: ([0, -1], [0, 2])}
        if rank not in expected:
            return result.fail(f"positions have rank {rank}, expected [B, S] or [S]", position_ids)
        if const_ints(axes) not in expected[rank]:
            return result.fail(f"Unsqueeze axes {const_ints(axes)} do not make positions [B, S, 1]", axes)
        return result

    def rewrite(self, op, position_ids, axes, inv_freq):
        inv = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1, 1)
        pos = position_ids
        if len(position_ids.shape) == 1:
            pos = op.Unsqueeze(pos, op.Constant(value_ints=[0]))
        pos = op.Cast(op.Unsqueeze(pos, op.Constant(value_ints=[1])), to=ir.DataType.FLOAT)
        return op.Transpose(op.MatMul(op.Constant(value=ir.tensor(inv)), pos), perm=[0, 2, 1])


def _one_row(v: ir.Value) -> bool:
    """``v`` is ``[1, S]``: by its shape, or (shapes not inferred yet) as ``Unsqueeze(range, [0])``."""
    if v.shape is not None:
        return len(v.shape) == 2 and v.shape[0] == 1
    node = v.producer()
    if node is None or node.op_type != "Unsqueeze" or len(node.inputs) < 2:
        return False
    src = node.inputs[0]
    return const_ints(node.inputs[1]) == [0] and src is not None and src.shape is not None and len(src.shape) == 1


def rotary_positions_per_row(model: ir.Model) -> int:
    """Give every ``RotaryEmbedding`` position ids with one row per batch row.

    An export without a KV cache computes positions as a ``[1, S]`` range that broadcasts over the
    batch; ONNX Runtime's ``RotaryEmbedding`` (and the ``GroupQueryAttention`` sequence lengths
    derived from it) want ``[batch, S]``. The range is expanded to the batch of ``input_ids``
    (else of the rotary input): the same positions in every row, as the source computed."""
    graph = model.graph
    ids = next((v for v in graph.inputs if v.name == "input_ids" and v.shape is not None and len(v.shape) == 2), None)
    expanded: dict[int, ir.Value] = {}
    n = 0
    for node in list(graph):
        if node.op_type != "RotaryEmbedding" or node.domain != MS or len(node.inputs) < 2:
            continue
        pos = node.inputs[1]
        if pos is None or not _one_row(pos):
            continue
        if id(pos) not in expanded:
            source = ids if ids is not None else node.inputs[0]
            tag = f"{pos.name or 'positions'}_per_row"
            batch = ir.node("Shape", [source], attributes={"start": 0, "end": 1}, name=f"{tag}_batch")
            seq = ir.node("Shape", [pos], attributes={"start": 1, "end": 2}, name=f"{tag}_seq")
            shape = ir.node("Concat", [batch.outputs[0], seq.outputs[0]], attributes={"axis": 0}, name=f"{tag}_shape")
            rows = ir.node("Expand", [pos, shape.outputs[0]], name=tag)
            out = rows.outputs[0]
            out.name, out.type = tag, pos.type or ir.TensorType(ir.DataType.INT64)
            seq_dim = pos.shape[1] if pos.shape is not None else "sequence_length"
            out.shape = ir.Shape([source.shape[0] if source.shape is not None else "batch", seq_dim])
            producer = pos.producer()
            if producer is not None:
                graph.insert_after(producer, [batch, seq, shape, rows])
            else:
                graph.insert_before(next(iter(graph)), [batch, seq, shape, rows])
            expanded[id(pos)] = out
        node.replace_input_with(1, expanded[id(pos)])
        n += 1
    return n

"""llmopt's own rules for the `fuse` pass (the onnxscript rules it also runs are listed in fuse.py).

Each rule either puts today's exports into the form the fusion patterns expect, or finishes what
those fusions leave for ONNX Runtime:

- ``gemm_to_matmul``: ``Gemm`` → ``MatMul`` + ``Add``.
- ``RotaryAngles`` (``rotary_angles``): transformers ≥ 5's rotary angles ``Mul(Cast(positions), inv_freq)``
  → the ``MatMul`` form onnxscript's cos/sin-cache rule matches (bit-identical).
- ``IdentityReshape`` (``identity_reshape``): a Reshape to the shape its input already has.
- ``canonical_dims``: symbolic dims written as sums (``past + seq`` / ``seq + past``) in one order,
  so shape checks that compare dims by name see that they are equal.
- ``PackQKV`` (``pack_qkv``): three Q/K/V projections of one input feeding ``GroupQueryAttention``
  → one MatMul over the concatenated weights (packed-QKV input of the kernel).
- ``gqa_seqlens_from_mask``: ``GroupQueryAttention``'s ``seqlens_k`` / ``total_sequence_length``
  computed once from the graph's ``attention_mask`` (per-row lengths, right padding) instead of
  from position ids, which are ``[1, S]`` in exports without a KV cache.
- ``rotary_positions_per_row``: a ``RotaryEmbedding`` fed ``[1, S]`` position ids (exports
  without a KV cache) gets them expanded to ``[batch, S]``, which ONNX Runtime's kernel requires.
- ``SlicedQKV`` (``sliced_qkv``): Phi-3's sliced packed projection → the packed GQA input, with
  or without a KV cache.
- ``FlattenedLinear`` (``flattened_linear``, ``flattened_linear_after_mha``): GPT-2's 2-D
  Reshape → MatMul (+ bias) → Reshape back → one MatMul over the 3-D input.
- ``GeluTanhHalfFirst`` (``gelu_half_first``): torch's tanh-GELU export → ``FastGelu``;
  ``FastGeluBias`` (``fast_gelu_bias``): the preceding bias Add into ``FastGelu``'s bias input.
- ``ScaledGQA`` (``gqa``): onnxscript's GroupQueryAttention rule, keeping the graph's attention
  scale (onnxscript's drops it: Granite's or Gemma's own scale fused to wrong numbers).
- ``SiluAsQuickGelu`` (``silu``): ``x * Sigmoid(x)`` → ``QuickGelu(x, alpha=1)``, one kernel.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import gqa, sdpa

from llmopt.core import graph_util
from llmopt.passes import fuse_mask

MS = "com.microsoft"


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def gemm_to_matmul(model: ir.Model) -> int:
    """Gemm(A, B, C) → MatMul(A, B') + C, so the rules (and later the rank of A) are free.

    onnxscript's own Gemm rewrite only covers some forms, and its shape optimizations can then
    drop the 2-D Reshape around a Gemm that GPT-2's export has, which ONNX Runtime refuses.
    """
    graph = model.graph
    n = 0
    for node in list(graph):
        if node.op_type != "Gemm" or not _is_default_domain(node):
            continue
        attrs = {k: v.value for k, v in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        a, b = node.inputs[0], node.inputs[1]
        new_nodes = []
        if attrs.get("transB", 0):
            t = ir.node("Transpose", [b], attributes={"perm": [1, 0]}, name=f"{node.name}_transB")
            new_nodes.append(t)
            b = t.outputs[0]
        mm = ir.node("MatMul", [a, b], name=f"{node.name}_matmul")
        new_nodes.append(mm)
        result = mm.outputs[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.node("Add", [result, node.inputs[2]], name=f"{node.name}_bias")
            new_nodes.append(add)
            result = add.outputs[0]
        old = node.outputs[0]
        result.shape, result.type = old.shape, old.type
        graph.insert_before(node, new_nodes)
        graph_util.replace_value(old, result)
        graph.remove(node, safe=True)
        n += 1
    return n


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(a) for a in value.const_value.numpy().reshape(-1)]


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
        if _ints(axes) not in expected[rank]:
            return result.fail(f"Unsqueeze axes {_ints(axes)} do not make positions [B, S, 1]", axes)
        return result

    def rewrite(self, op, position_ids, axes, inv_freq):
        inv = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1, 1)
        pos = position_ids
        if len(position_ids.shape) == 1:
            pos = op.Unsqueeze(pos, op.Constant(value_ints=[0]))
        pos = op.Cast(op.Unsqueeze(pos, op.Constant(value_ints=[1])), to=ir.DataType.FLOAT)
        return op.Transpose(op.MatMul(op.Constant(value=ir.tensor(inv)), pos), perm=[0, 2, 1])


class IdentityReshape(pattern.RewriteRuleClassBase):
    """``Reshape(x, shape)`` whose output has the same (symbolic) shape as ``x`` → ``x``.

    Phi-3's export reshapes the attention output to the shape it already has, which hides the
    SDPA → Transpose → Reshape chain the attention fusions look for.
    """

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _outputs=["y"])

    def check(self, context, x, y, **_):
        result = pattern.MatchResult()
        if x.shape is None or y.shape is None or len(x.shape) != len(y.shape):
            return result.fail("shapes unknown or of different rank", [x, y])
        for a, b in zip(x.shape, y.shape):
            if not (isinstance(a, int) and a == b) and not (
                isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim) and a.value is not None and a.value == b.value
            ):
                return result.fail(f"dims {a} and {b} are not provably equal", [x, y])
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


_TERM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^\d+$")


def canonical_dim(name: str) -> str:
    """``'seq + past'`` → ``'past + seq'``: the terms of a plain sum in sorted order; others unchanged."""
    terms = [t.strip() for t in name.split("+")]
    if len(terms) < 2 or not all(_TERM.match(t) for t in terms):
        return name
    return " + ".join(sorted(terms))


def canonical_dims(model: ir.Model) -> int:
    """Rewrite every symbolic dim that is a sum into its canonical spelling; returns dims changed."""
    changed = 0
    values = list(model.graph.inputs) + [v for node in model.graph for v in node.outputs]
    for value in values:
        shape = value.shape
        if shape is None:
            continue
        dims = list(shape)
        new = [ir.SymbolicDim(canonical_dim(d.value)) if isinstance(d, ir.SymbolicDim) and d.value else d for d in dims]
        if any(isinstance(a, ir.SymbolicDim) and a.value != b.value for a, b in zip(dims, new)):
            value.shape = ir.Shape(new)
            changed += 1
    return changed


class PackQKV(pattern.RewriteRuleClassBase):
    """``GroupQueryAttention(x·Wq [+bq], x·Wk [+bk], x·Wv [+bv], ...)`` → ``GroupQueryAttention(x·Wqkv [+bqkv], -, -, ...)``.

    One MatMul instead of three (what onnxruntime-genai's builder writes). The packed weight is a
    lazy tensor (a Constant, lifted to an initializer at the end of ``fuse``): it is concatenated
    when it is read or saved, one layer at a time.
    """

    def __init__(self, has_bias: bool, has_past: bool):
        super().__init__(f"PackQKV{'_bias' if has_bias else ''}{'_past' if has_past else ''}", remove_nodes=True)
        self.has_bias, self.has_past = has_bias, has_past

    def pattern(self, op, x, wq, wk, wv, bq, bk, bv, past_key, past_value, seqlens_k, total_len, cos, sin):  # noqa: PLR0913
        q, k, v = op.MatMul(x, wq), op.MatMul(x, wk), op.MatMul(x, wv)
        if self.has_bias:
            q, k, v = op.Add(q, bq), op.Add(k, bk), op.Add(v, bv)
        if not self.has_past:
            past_key = past_value = None
        return op.GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_len, cos, sin,
                                      _domain=MS, _allow_other_attributes=True, _outputs=3)

    def check(self, context, wq, wk, wv, bq=None, bk=None, bv=None, **_):
        result = pattern.MatchResult()
        for w in (wq, wk, wv):
            if w.const_value is None or len(w.const_value.shape) != 2:
                return result.fail("a projection weight is not a constant 2-D tensor", w)
        if len({w.const_value.shape[0] for w in (wq, wk, wv)}) != 1 or len({w.dtype for w in (wq, wk, wv)}) != 1:
            return result.fail("Q/K/V weights differ in input size or dtype", [wq, wk, wv])
        if self.has_bias:
            for b, w in ((bq, wq), (bk, wk), (bv, wv)):
                if b.const_value is None or tuple(b.const_value.shape) != (w.const_value.shape[1],):
                    return result.fail("a projection bias is not a constant vector of the output size", b)
        return result

    def rewrite(self, op, x, wq, wk, wv, seqlens_k, total_len, cos, sin, past_key=None, past_value=None,
                bq=None, bk=None, bv=None, **_):
        gqa = _find_gqa(wq)
        w = _lazy_concat([wq, wk, wv], axis=1, name=f"{wq.name}.packed_qkv")
        packed = op.MatMul(x, op.Constant(value=w))
        if self.has_bias:
            b = _lazy_concat([bq, bk, bv], axis=0, name=f"{bq.name}.packed_qkv")
            packed = op.Add(packed, op.Constant(value=b))
        attrs = {k: a.value for k, a in gqa.attributes.items()}
        return op.GroupQueryAttention(packed, None, None, past_key, past_value, seqlens_k, total_len, cos, sin,
                                      _domain=MS, _outputs=3, **attrs)


def _find_gqa(weight: ir.Value) -> ir.Node:
    for user, _ in weight.uses():
        for v in user.outputs:
            for consumer, _ in _consumers(v):
                if consumer.op_type == "GroupQueryAttention":
                    return consumer
    raise ValueError(f"no GroupQueryAttention fed by {weight.name}")


def _consumers(v: ir.Value):
    out = []
    for user, i in v.uses():
        out.append((user, i))
        if user.op_type == "Add":
            out.extend(user.outputs[0].uses())
    return out


def _lazy_concat(values: list[ir.Value], axis: int, name: str) -> ir.LazyTensor:
    tensors = [v.const_value for v in values]
    shape = list(tensors[0].shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)
    return ir.LazyTensor(lambda: ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=axis)),
                         dtype=tensors[0].dtype, shape=ir.Shape(shape), name=name)


def gqa_seqlens_from_mask(model: ir.Model) -> int:
    """Feed every GroupQueryAttention ``seqlens_k = sum(attention_mask, 1) - 1`` and
    ``total_sequence_length = attention_mask.shape[1]`` (int32), computed once for the graph.

    A graph without ``attention_mask`` (an export that takes ``input_ids`` only) gets them from
    ``input_ids``' shape instead (see ``gqa_seqlens_from_shape``): every row is the full length.
    Never from the exporter's own ``[1, S]`` position range, which holds for batch 1 only."""
    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == "attention_mask" and v.shape is not None and len(v.shape) == 2), None)
    nodes = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS and len(n.inputs) >= 7
             and not (n.inputs[5] is not None and n.inputs[5].name == "gqa_seqlens_k")]
    if not nodes:
        return 0
    if mask is None:
        return gqa_seqlens_from_shape(model, nodes)
    i64 = ir.DataType.INT64
    const = lambda name, arr: ir.node("Constant", [], attributes={"value": ir.tensor(np.array(arr, dtype=np.int64))}, name=name)  # noqa: E731
    axes, one, zero = const("gqa_axes_1", [1]), const("gqa_one", 1), const("gqa_squeeze_axes", [0])
    mask64 = ir.node("Cast", [mask], attributes={"to": i64}, name="gqa_mask_i64")
    total_tokens = ir.node("ReduceSum", [mask64.outputs[0], axes.outputs[0]], attributes={"keepdims": 0}, name="gqa_mask_sum")
    minus_one = ir.node("Sub", [total_tokens.outputs[0], one.outputs[0]], name="gqa_seqlens_i64")
    seqlens = ir.node("Cast", [minus_one.outputs[0]], attributes={"to": ir.DataType.INT32}, name="gqa_seqlens_k")
    width = ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="gqa_total_len_1d")
    width0 = ir.node("Squeeze", [width.outputs[0], zero.outputs[0]], name="gqa_total_len_i64")
    total = ir.node("Cast", [width0.outputs[0]], attributes={"to": ir.DataType.INT32}, name="gqa_total_sequence_length")
    seqlens.outputs[0].name, total.outputs[0].name = "gqa_seqlens_k", "gqa_total_sequence_length"
    seqlens.outputs[0].shape, seqlens.outputs[0].type = ir.Shape([mask.shape[0]]), ir.TensorType(ir.DataType.INT32)
    total.outputs[0].shape, total.outputs[0].type = ir.Shape([]), ir.TensorType(ir.DataType.INT32)
    graph.insert_before(nodes[0], [axes, one, zero, mask64, total_tokens, minus_one, seqlens, width, width0, total])
    for node in nodes:
        node.replace_input_with(5, seqlens.outputs[0])
        node.replace_input_with(6, total.outputs[0])
    return len(nodes)


def gqa_seqlens_from_shape(model: ir.Model, nodes: list[ir.Node]) -> int:
    """Without a mask: ``total_sequence_length`` = past length + ``input_ids.shape[1]`` and
    ``seqlens_k`` = that - 1 for every row of ``input_ids.shape[0]`` (no padding is expressible)."""
    graph = model.graph
    ids = next((v for v in graph.inputs if v.name == "input_ids" and v.shape is not None and len(v.shape) == 2), None)
    if ids is None or "gqa_seqlens_k_from_shape" in {v.name for n in graph for v in n.outputs}:
        return 0
    past = nodes[0].inputs[3]
    i32 = ir.DataType.INT32
    const = lambda name, arr: ir.node("Constant", [], attributes={"value": ir.tensor(np.array(arr, dtype=np.int64))}, name=name)  # noqa: E731
    one, zero = const("gqa_shape_one", 1), const("gqa_shape_axes", [0])
    batch = ir.node("Shape", [ids], attributes={"start": 0, "end": 1}, name="gqa_shape_batch")
    seq = ir.node("Shape", [ids], attributes={"start": 1, "end": 2}, name="gqa_shape_seq")
    new = [one, zero, batch, seq]
    total64 = seq
    if past is not None:  # a cache without a mask: the past length comes from the cache itself
        past_len = ir.node("Shape", [past], attributes={"start": 2, "end": 3}, name="gqa_shape_past")
        total64 = ir.node("Add", [past_len.outputs[0], seq.outputs[0]], name="gqa_shape_total")
        new += [past_len, total64]
    last = ir.node("Sub", [total64.outputs[0], one.outputs[0]], name="gqa_shape_last")
    rows = ir.node("Expand", [last.outputs[0], batch.outputs[0]], name="gqa_shape_rows")
    seqlens = ir.node("Cast", [rows.outputs[0]], attributes={"to": i32}, name="gqa_seqlens_k_from_shape")
    total0 = ir.node("Squeeze", [total64.outputs[0], zero.outputs[0]], name="gqa_shape_total_scalar")
    total = ir.node("Cast", [total0.outputs[0]], attributes={"to": i32}, name="gqa_total_sequence_length_from_shape")
    new += [last, rows, seqlens, total0, total]
    seqlens.outputs[0].name, total.outputs[0].name = "gqa_seqlens_k_from_shape", "gqa_total_sequence_length_from_shape"
    seqlens.outputs[0].shape, seqlens.outputs[0].type = ir.Shape([ids.shape[0]]), ir.TensorType(i32)
    total.outputs[0].shape, total.outputs[0].type = ir.Shape([]), ir.TensorType(i32)
    graph.insert_before(nodes[0], new)
    for node in nodes:
        node.replace_input_with(5, seqlens.outputs[0])
        node.replace_input_with(6, total.outputs[0])
    return len(nodes)


def _one_row(v: ir.Value) -> bool:
    """``v`` is ``[1, S]``: by its shape, or (shapes not inferred yet) as ``Unsqueeze(range, [0])``."""
    if v.shape is not None:
        return len(v.shape) == 2 and v.shape[0] == 1
    node = v.producer()
    if node is None or node.op_type != "Unsqueeze" or len(node.inputs) < 2:
        return False
    src = node.inputs[0]
    return _ints(node.inputs[1]) == [0] and src is not None and src.shape is not None and len(src.shape) == 1


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


class SiluAsQuickGelu(pattern.RewriteRuleClassBase):
    """``Mul(x, Sigmoid(x))`` → ``QuickGelu(x, alpha=1.0)`` (com.microsoft): SiLU in one kernel."""

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def rewrite(self, op, x):
        return op.QuickGelu(x, alpha=1.0, _domain=MS)


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim) and a.value is not None and a.value == b.value


class FlattenedLinear(pattern.RewriteRuleClassBase):
    """``Reshape(MatMul(Reshape(x, [-1, K]), W) [+ b], [B, S, N])`` → ``MatMul(x, W) [+ b]``.

    GPT-2's export flattens every linear layer to 2-D and back (its ``Conv1D`` is ``addmm``).
    MatMul broadcasts over the leading dims, so the pair of Reshapes is a no-op when the output
    shape is the input's leading dims plus N. ``source='mha'``: the input is a
    ``MultiHeadAttention`` output (already ``[B, S, D]``; the fusion left a 2-D annotation on it).
    """

    def __init__(self, has_bias: bool, source: str):
        super().__init__(f"FlattenedLinear{'_bias' if has_bias else ''}_{source}")
        self.has_bias, self.source = has_bias, source

    def pattern(self, op, x, flat, w, b, shape):
        inp = op.Reshape(x, flat) if self.source == "reshape" else x
        y = op.MatMul(inp, w)
        if self.has_bias:
            y = op.Add(y, b)
        return op.Reshape(y, shape, _outputs=["out"])

    def check(self, context, x, w, out, flat=None, b=None, **_):
        result = pattern.MatchResult()
        if w.const_value is None or len(w.const_value.shape) != 2:
            return result.fail("weight is not a constant 2-D tensor", w)
        k, n = w.const_value.shape
        if self.has_bias and (b.const_value is None or tuple(b.const_value.shape) != (n,)):
            return result.fail("bias is not a constant vector of the output size", b)
        if self.source == "reshape":
            lead = x.shape
            if lead is None or len(lead) != 3 or not _same_dim(lead[2], k):
                return result.fail("input is not [B, S, K]", x)
            if _ints(flat) != [-1, k]:
                return result.fail(f"inner Reshape is to {_ints(flat)}, not [-1, {k}]", flat)
        else:
            producer = x.producer()
            if producer is None or producer.op_type != "MultiHeadAttention" or producer.domain != MS:
                return result.fail("input is not a MultiHeadAttention output", x)
            lead = producer.inputs[0].shape
            if lead is None or len(lead) != 3:
                return result.fail("attention query is not [B, S, D]", producer.inputs[0])
        if out.shape is None or len(out.shape) != 3 or not all(_same_dim(a, c) for a, c in zip(out.shape[:2], lead[:2])) \
                or not _same_dim(out.shape[2], n):
            return result.fail(f"outer Reshape gives {out.shape}, not the input's leading dims plus {n}", out)
        return result

    def rewrite(self, op, x, w, b=None, **_):
        y = op.MatMul(x, w)
        return op.Add(y, b) if self.has_bias else y


class GeluTanhHalfFirst(pattern.RewriteRuleClassBase):
    """``(0.5·x) · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`` → ``FastGelu(x)``.

    onnxscript's tanh-GELU rule expects ``x · (0.5 · (1 + tanh(…)))``; torch's export of
    ``gelu(approximate='tanh')`` (GPT-2's ``gelu_new``) multiplies by 0.5 first.
    """

    def pattern(self, op, x, half, three, c1, c2, one):
        inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), c1)), c2)
        return op.Mul(op.Mul(x, half), op.Add(op.Tanh(inner), one))

    def check(self, context, half, three, c1, c2, one, **_):
        result = pattern.MatchResult()
        want = {"half": (half, 0.5), "three": (three, 3.0), "c1": (c1, 0.044715), "c2": (c2, (2 / np.pi) ** 0.5), "one": (one, 1.0)}
        for name, (v, expected) in want.items():
            if v.const_value is None or v.const_value.size != 1:
                return result.fail(f"{name} is not a constant scalar", v)
            if not np.isclose(float(v.const_value.numpy().reshape(-1)[0]), expected, rtol=1e-5):
                return result.fail(f"{name} is {float(v.const_value.numpy().reshape(-1)[0])}, not {expected}", v)
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain=MS)


class FastGeluBias(pattern.RewriteRuleClassBase):
    """``FastGelu(Add(x, b))`` with a constant vector ``b`` → ``FastGelu(x, b)`` (the kernel adds the bias)."""

    def pattern(self, op, x, b):
        return op.FastGelu(op.Add(x, b), _domain=MS)

    def check(self, context, x, b, **_):
        result = pattern.MatchResult()
        if b.const_value is None or len(b.const_value.shape) != 1:
            return result.fail("bias is not a constant vector", b)
        if x.shape is None or not _same_dim(x.shape[-1], b.const_value.shape[0]):
            return result.fail("bias length differs from the last dim", [x, b])
        return result

    def rewrite(self, op, x, b):
        return op.FastGelu(x, b, _domain=MS)


class SlicedQKV(pattern.RewriteRuleClassBase):
    """``GroupQueryAttention(p[..., :Dq], p[..., Dq:Dq+Dkv], p[..., Dq+Dkv:], ...)`` → ``GroupQueryAttention(p, -, -, ...)``.

    Phi-3 projects Q, K and V with one packed weight and slices the result. onnxscript's rule does
    this when the node has a KV cache; this one covers both (``has_past``).
    """

    def __init__(self, has_past: bool):
        super().__init__(f"SlicedQKV{'_past' if has_past else ''}")
        self.has_past = has_past

    def pattern(self, op, p, s0, e0, s1, e1, s2, e2, axes, st0, st1, st2, past_key, past_value, seqlens_k, total_len, cos, sin):
        q = op.Slice(p, s0, e0, axes, st0, _outputs=["q"])
        k = op.Slice(p, s1, e1, axes, st1, _outputs=["k"])
        v = op.Slice(p, s2, e2, axes, st2, _outputs=["v"])
        if not self.has_past:
            past_key = past_value = None
        return op.GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_len, cos, sin,
                                      _domain=MS, _allow_other_attributes=True, _outputs=3)

    def check(self, context, p, s0, e0, s1, e1, s2, e2, axes, st0, st1, st2, **_):
        result = pattern.MatchResult()
        if p.shape is None or len(p.shape) != 3 or not isinstance(p.shape[2], int):
            return result.fail("packed input is not [B, S, D] with a known D", p)
        if _ints(axes) not in ([2], [-1]):
            return result.fail("slices are not on the last axis", axes)
        width = p.shape[2]
        bounds = [(_ints(s0), _ints(e0)), (_ints(s1), _ints(e1)), (_ints(s2), _ints(e2))]
        if any(s is None or e is None or len(s) != 1 or len(e) != 1 for s, e in bounds):
            return result.fail("slice bounds are not constants", [s0, e0, s1, e1, s2, e2])
        (a0, b0), (a1, b1), (a2, b2) = ((s[0], min(e[0], width)) for s, e in bounds)
        if not (a0 == 0 and b0 == a1 and b1 == a2 and b2 == width):
            return result.fail(f"slices [{a0}:{b0}], [{a1}:{b1}], [{a2}:{b2}] do not tile [0:{width}] in Q, K, V order", p)
        for steps in (st0, st1, st2):
            if _ints(steps) != [1]:
                return result.fail("a slice has a step other than 1", steps)
        return result

    def rewrite(self, op, p, seqlens_k, total_len, cos, sin, q, past_key=None, past_value=None, **_):
        gqa = next(u for u, _ in q.uses() if u.op_type == "GroupQueryAttention")
        attrs = {k: a.value for k, a in gqa.attributes.items()}
        return op.GroupQueryAttention(p, None, None, past_key, past_value, seqlens_k, total_len, cos, sin,
                                      _domain=MS, _outputs=3, **attrs)


class ScaledGQA(gqa.GroupQueryAttention):
    """onnxscript's ``GroupQueryAttention`` rule, carrying the attention scale.

    The SDPA it consumes records the scale the graph applies to ``Q·Kᵀ`` (``None``: the default
    1/√head_size); onnxscript's rule drops it, so a model with its own scale (Granite's
    ``attention_multiplier``, Gemma's ``query_pre_attn_scalar``) fused to the wrong numbers. The
    kernel takes the scale as an attribute; this rule sets it.

    It also reads the mask the kernel replaces (``fuse_mask``): a sliding window becomes
    ``local_window_size``; onnxscript's rule drops any mask unchecked, so Mistral's window was lost.
    """

    def check(self, context, query_BHSDh_rope, mask=None, **kwargs):
        result = super().check(context, query_BHSDh_rope=query_BHSDh_rope, mask=mask, **kwargs)
        if not result:
            return result
        try:
            self._window = fuse_mask.sliding_window(mask)
        except fuse_mask.MaskNotUnderstood as exc:
            return pattern.MatchResult().fail(str(exc), mask)
        node = next((u.node for u in query_BHSDh_rope.uses() if u.node.op_type == "SDPA"), None)
        scale = node.attributes.get("scale") if node is not None else None
        self._scale = None if scale is None or scale.value is None else float(scale.value)
        cap = node.attributes.get("softcap") if node is not None else None
        self._softcap = None if cap is None else float(cap.value)
        return result

    def rewrite(self, op, **kwargs):
        outputs = super().rewrite(op, **kwargs)
        node = outputs[0].producer()
        if self._scale is not None:
            node.attributes["scale"] = ir.AttrFloat32("scale", self._scale)
        if self._window is not None:
            node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", self._window)
        if self._softcap is not None:
            node.attributes["softcap"] = ir.AttrFloat32("softcap", self._softcap)
        return outputs


class SoftcapSDPA(sdpa.SDPA):
    """onnxscript's ``SDPA`` rule with a logit soft cap between the scaled scores and the mask:
    ``cap * tanh(scores / cap)`` (Gemma 2). The internal SDPA node carries ``softcap``;
    ``ScaledGQA`` hands it to GroupQueryAttention, which has the attribute (MultiHeadAttention has
    not: there the guard rolls the attention back)."""

    def pattern(self, op, query, key, value, mask, query_scale, key_scale, qk_scale, cap_in, cap_out):  # noqa: PLR0913
        key_transposed = pattern.OrValue(
            [op.Transpose(key, perm=[0, 1, 3, 2]),
             op.Reshape(op.Transpose(op.Reshape(key, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE),
             op.Transpose(key, perm=[0, 2, 3, 1])],
            tag_var="key_format", tag_values=["BHSd", "BHSd", "BSHd"])
        query = pattern.OrValue([op.Mul(query, query_scale), op.Div(query, query_scale), query],
                                tag_var="query_scaling", tag_values=["Mul", "Div", "None"])
        key_transposed = pattern.OrValue(
            [op.Mul(key_transposed, key_scale), op.Div(key_transposed, key_scale), key_transposed],
            tag_var="key_scaling", tag_values=["Mul", "Div", "None"])
        score = op.MatMul(query, key_transposed)
        score = pattern.OrValue([op.Mul(score, qk_scale), op.Div(score, qk_scale), score],
                                tag_var="qk_scaling", tag_values=["Mul", "Div", "None"])
        capped = op.Mul(op.Tanh(op.Div(score, cap_in)), cap_out)
        capped = pattern.OrValue([op.Add(capped, mask), capped], tag_var="has_mask", tag_values=[True, False])
        weight = op.Softmax(capped, axis=-1)
        weight = pattern.OrValue([op.Where(op.IsNaN(weight), 0.0, weight), weight])
        return op.MatMul(weight, value)

    def check(self, context, cap_in, cap_out, **kwargs):
        from onnxscript.rewriter import _ir_utils

        result = super().check(context, **kwargs)
        if not result:
            return result
        a, b = _ir_utils.get_singleton_value(cap_in), _ir_utils.get_singleton_value(cap_out)
        if a is None or b is None or float(a) != float(b) or float(a) <= 0:
            return pattern.MatchResult().fail(f"not a soft cap: tanh(x / {a}) * {b}", [cap_in, cap_out])
        self._softcap = float(a)
        return result

    def rewrite(self, op, **kwargs):
        out = super().rewrite(op, **{k: v for k, v in kwargs.items() if k not in ("cap_in", "cap_out")})
        out.producer().attributes["softcap"] = ir.AttrFloat32("softcap", self._softcap)
        return out

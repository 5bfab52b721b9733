"""llmopt's own rules for the `fuse` pass: attention.

- ``PackQKV`` (``pack_qkv``): three Q/K/V projections of one input feeding ``GroupQueryAttention``
  → one MatMul over the concatenated weights (packed-QKV input of the kernel).
- ``gqa_seqlens_from_mask``: ``GroupQueryAttention``'s ``seqlens_k`` / ``total_sequence_length``
  computed once from the graph's ``attention_mask`` (per-row lengths, right padding) instead of
  from position ids, which are ``[1, S]`` in exports without a KV cache.
- ``SlicedQKV`` (``sliced_qkv``): Phi-3's sliced packed projection → the packed GQA input, with
  or without a KV cache.
- ``ScaledGQA`` (``gqa``): onnxscript's GroupQueryAttention rule, keeping the graph's attention
  scale (onnxscript's drops it: Granite's or Gemma's own scale fused to wrong numbers).
- ``SoftcapSDPA`` (``sdpa_softcap``): onnxscript's SDPA rule with Gemma 2's logit soft cap.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import gqa, sdpa

from llmopt.passes import fuse_mask
from llmopt.passes.fuse_common import MS, const_ints


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
        if const_ints(axes) not in ([2], [-1]):
            return result.fail("slices are not on the last axis", axes)
        width = p.shape[2]
        bounds = [(const_ints(s0), const_ints(e0)), (const_ints(s1), const_ints(e1)), (const_ints(s2), const_ints(e2))]
        if any(s is None or e is None or len(s) != 1 or len(e) != 1 for s, e in bounds):
            return result.fail("slice bounds are not constants", [s0, e0, s1, e1, s2, e2])
        (a0, b0), (a1, b1), (a2, b2) = ((s[0], min(e[0], width)) for s, e in bounds)
        if not (a0 == 0 and b0 == a1 and b1 == a2 and b2 == width):
            return result.fail(f"slices [{a0}:{b0}], [{a1}:{b1}], [{a2}:{b2}] do not tile [0:{width}] in Q, K, V order", p)
        for steps in (st0, st1, st2):
            if const_ints(steps) != [1]:
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

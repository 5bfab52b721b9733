"""`kv-cache`: give a decoder graph the KV-cache I/O llmopt's runtime (and onnxruntime-genai) drive.

- A graph **with** a cache is canonicalized: inputs ``past_key_values.{i}.key/value`` and outputs
  ``present.{i}.key/value``, layout ``[batch, kv_heads, seq, head_dim]`` (checked).
- A graph **without** a cache (``input_ids, attention_mask → logits``) must have its attention
  fused to ``GroupQueryAttention`` first (run ``fuse`` before; the pass says so otherwise). Each
  GroupQueryAttention gets the layer's past inputs and present outputs, ``attention_mask`` becomes
  ``[batch, total_sequence_length]`` (past + new; ``fuse`` already derives the kernel's lengths from
  it) and the rotary cos/sin tables, which the export computed for the current positions only,
  become constants for ``max_length`` positions. Positions come from the mask inside the kernel,
  so no ``position_ids`` input is needed. A graph that takes ``input_ids`` alone gets an
  ``attention_mask`` input too (its lengths came from ``input_ids``' shape, which knows no past).
- ``buffer=shared`` records in the model's metadata that the runtime should preallocate
  ``max_length`` caches and bind past and present to the same memory (GroupQueryAttention then
  writes the new entries in place instead of copying the cache every step).

The layout is written to the model's metadata (``llmopt.kv_cache``, JSON) for the runtime.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from llmopt.core import graph_util
from llmopt.errors import LlmoptError
from llmopt.core.pass_base import Pass, PreconditionError, option
from llmopt.core.registry import register_pass

MS = "com.microsoft"
METADATA_KEY = "llmopt.kv_cache"
BUFFERS = ("auto", "concat", "shared")

# Past/present names other exporters use → (kind, layer, key|value).
_PAST = [re.compile(p) for p in (r"^past_key_values\.(\d+)\.(key|value)$", r"^past\.(\d+)\.(key|value)$",
                                 r"^past_(key|value)_values?\.(\d+)$", r"^past_(key|value)\.(\d+)$")]
_PRESENT = [re.compile(p) for p in (r"^present\.(\d+)\.(key|value)$", r"^present_(key|value)_values?\.(\d+)$",
                                    r"^present_(key|value)\.(\d+)$", r"^present_key_values\.(\d+)\.(key|value)$")]


class KVCacheError(LlmoptError):
    """The graph cannot be given (or does not have) a KV cache in the canonical form."""


class KVCacheNotReady(KVCacheError, PreconditionError):
    """``requires`` refused the graph: an earlier pass (``fuse``) is missing. Both a KVCacheError
    (what callers of the pass catch) and a PipelineError (what a failed precondition raises)."""


_SHARED_NEEDS_GQA = ("kv-cache{buffer=shared} needs GroupQueryAttention (the kernel that writes a shared "
                     "cache in place); this graph's attention is not fused to it: run 'fuse' first, "
                     "or use buffer=concat")


def _is_decoder(graph: ir.Graph) -> bool:
    return "input_ids" in {v.name for v in graph.inputs} and "logits" in {v.name for v in graph.outputs}


def _unfused_attention(graph: ir.Graph) -> str | None:
    """Why a graph without a cache cannot be given one yet (its attention is not all GroupQueryAttention), or None."""
    gqas = sum(n.op_type == "GroupQueryAttention" and n.domain == MS for n in graph)
    unfused = sum(n.op_type in ("MultiHeadAttention", "Attention", "Softmax") for n in graph)
    if gqas and not unfused:
        return None
    return (f"kv-cache: this graph has no KV cache and {unfused} of its attention blocks are not fused to "
            f"GroupQueryAttention ({gqas} are): put 'fuse' before 'kv-cache' in the pipeline, "
            "or export with the cache (llmopt export --with-past)")


@dataclasses.dataclass(frozen=True)
class KVCacheOptions:
    buffer: str = option("auto", "shared: preallocated caches written in place (needs GroupQueryAttention) | concat: present = past + new each step | auto: shared where possible")
    max_length: int = option(4096, "longest sequence (prompt + new tokens) the rewritten graph and a shared buffer hold")
    require: bool = option(False, "fail when a decoder without a cache cannot be given one (else: leave it, with a warning)")

    def __post_init__(self):
        from llmopt.errors import PipelineError

        if self.buffer not in BUFFERS:
            raise PipelineError(f"kv-cache: buffer={self.buffer!r} is not one of {', '.join(BUFFERS)}")
        if self.max_length < 2:
            raise PipelineError(f"kv-cache: max_length={self.max_length} must be at least 2")


def _parse(name: str, patterns) -> tuple[int, str] | None:
    for p in patterns:
        m = p.match(name)
        if m:
            a, b = m.groups()
            return (int(a), b) if a.isdigit() else (int(b), a)
    return None


@register_pass
class KVCache(Pass):
    name = "kv-cache"
    summary = "Add or canonicalize KV-cache I/O (past_key_values.{i}.key/value → present.{i}.key/value)."
    Options = KVCacheOptions

    def requires(self, model: ir.Model) -> None:
        """Refuses (``KVCacheNotReady``) a decoder whose attention is not fused where a cache cannot go
        without it: no cache yet and ``require=true`` or ``buffer=shared``, or ``buffer=shared`` on a cache
        without GroupQueryAttention. With ``require=false`` (targets' pipelines) a graph without a cache
        whose attention is not fused is not refused: ``run`` leaves it as it was, with a warning."""
        graph = model.graph
        if not _is_decoder(graph):
            return  # not a decoder: `run` leaves it alone
        shared = self.options.buffer == "shared"
        if not any(_parse(v.name, _PAST) for v in graph.inputs):
            problem = _unfused_attention(graph) if self.options.require or shared else None
        else:
            has_gqa = any(n.op_type == "GroupQueryAttention" and n.domain == MS for n in graph)
            problem = _SHARED_NEEDS_GQA if shared and not has_gqa else None
        if problem:
            raise KVCacheNotReady(problem)

    def run(self, model: ir.Model) -> bool:
        graph = model.graph
        if not _is_decoder(graph):
            self.count("not_a_decoder")  # nothing to cache: leave encoders and other graphs alone
            return False
        pasts = {v: _parse(v.name, _PAST) for v in graph.inputs}
        pasts = {v: k for v, k in pasts.items() if k is not None}
        if pasts:
            layout = self._canonicalize(model, pasts)
        else:
            snapshot = model.clone()  # adding a cache is all or nothing: a failure leaves the graph as it was
            try:
                layout = self._add_cache(model)
            except KVCacheError as exc:
                if self.options.require or self.options.buffer == "shared":
                    raise
                model.graph = snapshot.graph
                self.counters.clear()
                self.count("left_without_cache")
                self.warn(f"{exc.args[0].removeprefix('kv-cache: ')} — the artifact has no KV cache")
                return False
        buffer = self.options.buffer
        if buffer == "auto":
            buffer = "shared" if layout["group_query_attention"] else "concat"
        layout.update(buffer=buffer, max_length=self.options.max_length)
        if layout["buffer"] == "shared" and not layout["group_query_attention"]:
            raise KVCacheError(_SHARED_NEEDS_GQA)
        text = json.dumps(layout, sort_keys=True)
        changed = model.metadata_props.get(METADATA_KEY) != text
        model.metadata_props[METADATA_KEY] = text
        if model.metadata_props.get("llmopt.with_past") == "false":
            model.metadata_props["llmopt.with_past"] = "true"
        return changed or bool(self.counters)

    # ------------------------------------------------------------------ existing cache
    def _canonicalize(self, model: ir.Model, pasts: dict[ir.Value, tuple[int, str]]) -> dict:
        graph = model.graph
        layers = sorted({layer for layer, _ in pasts.values()})
        if layers != list(range(len(layers))) or len(pasts) != 2 * len(layers):
            raise KVCacheError(f"kv-cache: past inputs {sorted(v.name for v in pasts)} are not one key and one value per layer 0..N-1")
        kv_heads = head_dim = None
        for value, (layer, kind) in pasts.items():
            shape = value.shape
            dims = graph_util.cache_dims(value)  # the genai builder leaves head_size symbolic: from the attention
            if shape is not None and len(shape) == 4 and dims is not None and not isinstance(shape[3], int):
                value.shape = shape = ir.Shape([shape[0], dims[0], shape[2], dims[1]])
            if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
                raise KVCacheError(f"kv-cache: input '{value.name}' has shape {shape}; expected [batch, kv_heads, seq, head_dim] "
                                   "with kv_heads and head_dim fixed")
            kv_heads, head_dim = shape[1], shape[3]
            self._rename(value, f"past_key_values.{layer}.{kind}", "renamed_inputs")
        presents = {v: _parse(v.name, _PRESENT) for v in graph.outputs}
        for value, key in presents.items():
            if key is not None:
                self._rename(value, f"present.{key[0]}.{key[1]}", "renamed_outputs")
        if sum(k is not None for k in presents.values()) != len(pasts):
            raise KVCacheError("kv-cache: the graph has past inputs but not one present output for each")
        gqa = any(n.op_type == "GroupQueryAttention" and n.domain == MS for n in model.graph)
        return {"layers": len(layers), "kv_heads": kv_heads, "head_dim": head_dim, "group_query_attention": gqa,
                "rewritten_from_no_cache": False}

    def _rename(self, value: ir.Value, name: str, counter: str) -> None:
        if value.name != name:
            value.name = name
            self.count(counter)

    # ------------------------------------------------------------------ no cache yet
    def _add_cache(self, model: ir.Model) -> dict:
        graph = model.graph
        problem = _unfused_attention(graph)
        if problem:
            raise KVCacheError(problem)
        gqas = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS]
        mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
        if mask is None:  # an input_ids-only export: a cache needs lengths, so the mask becomes an input
            mask = self._add_mask(model, gqas)
        batch = mask.shape[0] if mask.shape is not None else "batch"
        kv_heads = head_dim = None
        for layer, node in enumerate(gqas):
            if node.inputs[3] is not None or node.inputs[4] is not None:
                raise KVCacheError(f"kv-cache: {node.name} already has past inputs but the graph has none")
            kv_heads = node.attributes["kv_num_heads"].as_int()
            q = node.inputs[0]
            head_dim = graph_util.gqa_head_dim(node)
            if head_dim is None:
                raise KVCacheError(f"kv-cache: the width of {node.name}'s query is unknown; run 'cleanup' (shape inference) first")
            dtype = q.dtype or _float_dtype(graph)  # a contrib op's output (e.g. q-norm) may carry no type
            for slot, kind in ((3, "key"), (4, "value")):
                past = ir.Value(name=f"past_key_values.{layer}.{kind}", type=ir.TensorType(dtype),
                                shape=ir.Shape([batch, kv_heads, "past_sequence_length", head_dim]))
                graph.inputs.append(past)
                node.replace_input_with(slot, past)
                present = node.outputs[slot - 2]
                present.name = f"present.{layer}.{kind}"
                present.shape = ir.Shape([batch, kv_heads, "total_sequence_length", head_dim])
                present.type = ir.TensorType(dtype)
                graph.outputs.append(present)
            self.count("layers_given_cache")
        self.count("cos_sin_tables", self._constant_rotary_tables(model, gqas))
        common.RemoveUnusedNodesPass()(model)
        self.count("mask_dims_from_input_ids", _dims_from_input_ids(model, mask))
        others = _mask_readers(model, mask)
        if others:
            raise KVCacheError(f"kv-cache: attention_mask also feeds {', '.join(sorted(others))}, which "
                               "would read its new width (past + new tokens) as the new tokens' length")
        mask.shape = ir.Shape([batch, "total_sequence_length"])
        return {"layers": len(gqas), "kv_heads": kv_heads, "head_dim": head_dim, "group_query_attention": True,
                "rewritten_from_no_cache": True}

    def _add_mask(self, model: ir.Model, gqas: list[ir.Node]) -> ir.Value:
        """``attention_mask [batch, total_sequence_length]`` as a new input, and GroupQueryAttention's
        lengths taken from it (they came from ``input_ids``' shape, which knows no past)."""
        from llmopt.passes.fuse_attention import gqa_seqlens_from_mask

        graph = model.graph
        ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
        if ids is None:
            raise KVCacheError("kv-cache: the graph has neither 'attention_mask' nor 'input_ids' to take the sequence lengths from")
        batch = ids.shape[0] if ids.shape is not None else "batch"
        mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64),
                        shape=ir.Shape([batch, "total_sequence_length"]))
        graph.inputs.insert(list(graph.inputs).index(ids) + 1, mask)
        for node in gqas:  # forget the shape-derived lengths, so the mask-derived ones replace them
            node.replace_input_with(5, None)
            node.replace_input_with(6, None)
        gqa_seqlens_from_mask(model)
        self.count("attention_mask_added")
        return mask

    def _constant_rotary_tables(self, model: ir.Model, gqas: list[ir.Node]) -> int:
        """cos/sin inputs computed from the current positions → constant tables for max_length positions."""
        done: dict[int, ir.Value] = {}
        n = 0
        for node in gqas:
            for slot in (7, 8):
                value = node.inputs[slot] if len(node.inputs) > slot else None
                if value is None or value.const_value is not None:
                    continue
                if id(value) not in done:
                    table = _evaluate_table(value, self.options.max_length)
                    done[id(value)] = graph_util.add_initializer(model.graph, f"{value.name}_table_{self.options.max_length}", table)
                    n += 1
                node.replace_input_with(slot, done[id(value)])
        return n


def _mask_readers(model: ir.Model, mask: ir.Value) -> set[str]:
    """Nodes that use attention_mask other than to compute GroupQueryAttention's lengths (inputs 5, 6):
    everything downstream of the mask must be small integer arithmetic ending there."""
    bad, seen, todo = set(), set(), [mask]
    outputs = set(map(id, model.graph.outputs))
    while todo:
        value = todo.pop()
        if id(value) in outputs:
            bad.add(f"graph output {value.name}")
        for user, slot in value.uses():
            if user.op_type == "GroupQueryAttention":
                if slot not in (5, 6):
                    bad.add(user.name)
                continue
            if id(user) in seen:
                continue
            seen.add(id(user))
            for out in user.outputs:
                if out.dtype is not None and out.dtype.is_floating_point():
                    bad.add(user.name)
                todo.append(out)
    return bad


def _dims_from_input_ids(model: ir.Model, mask: ir.Value) -> int:
    """Without a cache the mask and ``input_ids`` have the same shape, and torch.export may read the
    batch or sequence length off either; with one, the mask grows to past + new tokens. Readers of
    the mask's shape (``Shape`` over dims 0..1) that feed more than GroupQueryAttention's lengths
    are given the same ``Shape`` of ``input_ids``, which keeps their meaning."""
    graph = model.graph
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    if ids is None:
        return 0
    n = 0
    for shape, slot in list(mask.uses()):
        if shape.op_type != "Shape" or shape.domain != "" or slot != 0:
            continue
        start, end = shape.attributes.get_int("start", 0), shape.attributes.get_int("end", None)
        if end is None or not 0 <= start < end <= 2:
            continue
        twin = None
        for user, i in list(shape.outputs[0].uses()):
            if user.op_type == "GroupQueryAttention" or not any(_mask_readers(model, o) for o in user.outputs):
                continue  # the lengths GroupQueryAttention takes from the mask
            if twin is None:
                twin = ir.node("Shape", [ids], attributes={"start": start, "end": end}, name=f"{shape.name}_of_input_ids")
                graph.insert_after(shape, twin)
                n += 1
            user.replace_input_with(i, twin.outputs[0])
    return n


# Ops a rotary table is computed with, evaluated in numpy (positions → angles → cos/sin).
def _np_op(node: ir.Node, args: list, max_length: int):
    op = node.op_type
    attr = {k: a.value for k, a in node.attributes.items()}
    if op == "Range":
        return np.arange(0, max_length, dtype=args[0].dtype)  # the positions: 0 .. max_length-1
    if op == "Cast":
        return args[0].astype(ir.DataType(attr["to"]).numpy())
    if op == "Reshape":
        return args[0].reshape([d if d != 0 else args[0].shape[i] for i, d in enumerate(args[1].tolist())])
    if op == "Unsqueeze":
        return np.expand_dims(args[0], tuple(int(a) for a in np.atleast_1d(args[1])))
    if op == "Squeeze":
        return np.squeeze(args[0], tuple(int(a) for a in np.atleast_1d(args[1]))) if len(args) > 1 else np.squeeze(args[0])
    if op == "Transpose":
        return np.transpose(args[0], attr.get("perm"))
    if op == "Concat":
        return np.concatenate(args, axis=attr["axis"])
    if op in ("MatMul", "Mul", "Add", "Cos", "Sin", "Div"):
        f = {"MatMul": np.matmul, "Mul": np.multiply, "Add": np.add, "Div": np.divide, "Cos": np.cos, "Sin": np.sin}[op]
        return f(*args)
    raise KVCacheError(f"kv-cache: cannot precompute the rotary table: op {op} ({node.name}) in its computation; "
                       "export with the cache instead (llmopt export --with-past)")


def _evaluate_table(value: ir.Value, max_length: int) -> np.ndarray:
    """Evaluate the subgraph producing ``value`` with its positions Range replaced by 0..max_length-1."""
    memo: dict[int, np.ndarray] = {}

    def ev(v: ir.Value) -> np.ndarray:
        if v.const_value is not None:
            return v.const_value.numpy()
        if id(v) in memo:
            return memo[id(v)]
        node = v.producer()
        if node is None:
            raise KVCacheError(f"kv-cache: the rotary table depends on graph input '{v.name}' beyond the positions")
        if node.op_type == "Constant":
            result = node.attributes["value"].value.numpy()
        elif node.op_type == "Range":
            start, delta = ev(node.inputs[0]), ev(node.inputs[2])
            if start.size != 1 or int(start.reshape(-1)[0]) != 0 or int(delta.reshape(-1)[0]) != 1:
                raise KVCacheError(f"kv-cache: positions Range {node.name} does not count 0, 1, 2, ...")
            result = _np_op(node, [start], max_length)
        else:
            result = _np_op(node, [ev(i) for i in node.inputs if i is not None], max_length)
        memo[id(v)] = result
        return result

    return np.ascontiguousarray(ev(value).astype(np.float32))


def _float_dtype(graph: ir.Graph) -> ir.DataType:
    """The graph's float type: its logits' (fp32 when that is not known either)."""
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    return logits.dtype if logits is not None and logits.dtype is not None else ir.DataType.FLOAT

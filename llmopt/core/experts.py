"""Mixture-of-experts facts of a graph: which weights belong to experts, how many experts there are
and how many each token uses — so that ``inspect`` can say total vs active parameters and ``bench``
can count the bytes a decode step really reads.

Two forms are recognized:

- fused: ``com.microsoft::MoE`` / ``QMoE`` nodes. Every constant input after the router logits
  whose leading dimension is the expert count (weights, scales, zero points, biases) is an expert
  tensor; ``k`` is the node's attribute;
- as exported: rows of 3-D constants gathered (``Gather`` axis 0, ``GatherND``) by one index value,
  with the 2-D constants (biases) gathered by the same index. ``k`` comes from the ``TopK`` the
  index derives from (or the count of ``ArgMax`` picks concatenated, Phi-MoE's router); when no
  such node is found it is unknown and every expert counts as read.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from llmopt.core import graph_util

MS = "com.microsoft"
PASS_THROUGH = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Cast", "Identity"}


@dataclasses.dataclass(frozen=True)
class ExpertGroup:
    """The expert tensors of one block."""

    tensors: tuple[str, ...]
    experts: int
    k: int | None  # experts per token (None: unknown)
    count: int  # parameters (elements)
    bytes: int

    def fraction_read(self, tokens: int) -> float:
        """Expected share of the experts that ``tokens`` tokens read, routing uniformly at random:
        ``1 - (1 - k/E)^tokens`` (k/E for one token); 1 when k is unknown."""
        if not self.k or self.k >= self.experts:
            return 1.0
        return 1.0 - (1.0 - self.k / self.experts) ** max(1, tokens)


def gathered_constant(node: ir.Node) -> ir.Value | None:
    """The constant data input of a row gather over the leading axis, if ``node`` is one."""
    if node.domain != "" or node.op_type not in ("Gather", "GatherND"):
        return None
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) != 0:
        return None
    if node.op_type == "GatherND" and node.attributes.get_int("batch_dims", 0) != 0:
        return None
    data = node.inputs[0]
    return data if data is not None and data.const_value is not None else None


def expert_groups(model: ir.Model) -> list[ExpertGroup]:
    groups = [_fused(n) for n in model.graph if n.domain == MS and n.op_type in ("MoE", "QMoE")]
    return [g for g in groups if g is not None] + _exported(model.graph)


def parameter_split(model: ir.Model) -> dict | None:
    """Total, expert and active-per-token parameters (elements and bytes), or None without experts."""
    groups = expert_groups(model)
    if not groups:
        return None
    stats = graph_util.parameter_stats(model).values()
    total_count, total_bytes = sum(s["count"] for s in stats), sum(s["bytes"] for s in stats)
    expert_count = sum(g.count for g in groups)
    expert_bytes = sum(g.bytes for g in groups)
    active_count = total_count - expert_count + sum(g.count * g.fraction_read(1) for g in groups)
    active_bytes = total_bytes - expert_bytes + sum(g.bytes * g.fraction_read(1) for g in groups)
    ks = sorted({g.k for g in groups if g.k})
    return {
        "blocks": len(groups),
        "total_count": total_count,
        "total_bytes": total_bytes,
        "experts": sorted({g.experts for g in groups}),
        "k": ks,
        "k_unknown_blocks": sum(1 for g in groups if not g.k),
        "expert_count": expert_count,
        "expert_bytes": expert_bytes,
        "active_count": int(round(active_count)),
        "active_bytes": int(round(active_bytes)),
    }


def _group(values: list[ir.Value], experts: int, k: int | None) -> ExpertGroup:
    seen: dict[str, ir.Value] = {}
    for v in values:
        seen.setdefault(v.name or str(id(v)), v)
    return ExpertGroup(tuple(seen), experts, k, sum(v.const_value.size for v in seen.values()),
                       sum(v.const_value.nbytes for v in seen.values()))


def _fused(node: ir.Node) -> ExpertGroup | None:
    fc1 = node.inputs[2] if len(node.inputs) > 2 else None
    if fc1 is None or fc1.const_value is None:
        return None
    experts = int(fc1.const_value.shape[0])
    tensors = [v for v in node.inputs[2:] if v is not None and v.const_value is not None
               and v.const_value.shape.rank() >= 1 and int(v.const_value.shape[0]) == experts]
    return _group(tensors, experts, node.attributes.get_int("k", None))


def gathers_by_index(graph: ir.Graph) -> list[tuple[ir.Value, list[ir.Node]]]:
    """Row gathers of 2-D or 3-D constants, grouped by the index value they share, for the index
    values that gather at least one 3-D constant (expert weights; 2-D ones are their biases)."""
    by_index: dict[int, tuple[ir.Value, list[ir.Node]]] = {}
    for node in graph:
        data = gathered_constant(node)
        if data is not None and data.const_value.shape.rank() in (2, 3) and node.inputs[1] is not None:
            by_index.setdefault(id(node.inputs[1]), (node.inputs[1], []))[1].append(node)
    return [(index, nodes) for index, nodes in by_index.values()
            if any(n.inputs[0].const_value.shape.rank() == 3 for n in nodes)]


def _exported(graph: ir.Graph) -> list[ExpertGroup]:
    groups = []
    for index, nodes in gathers_by_index(graph):
        tensors = [n.inputs[0] for n in nodes]
        experts = next(int(t.const_value.shape[0]) for t in tensors if t.const_value.shape.rank() == 3)
        same = [t for t in tensors if int(t.const_value.shape[0]) == experts]
        groups.append(_group(same, experts, _k_of(index)))
    return groups


def _k_of(index: ir.Value) -> int | None:
    v = index
    while (p := v.producer()) is not None and p.op_type in PASS_THROUGH and p.domain == "":
        v = p.inputs[0]
    p = v.producer()
    if p is None:
        return None
    if p.op_type == "TopK" and p.inputs[1] is not None and p.inputs[1].const_value is not None:
        return int(p.inputs[1].const_value.numpy().reshape(-1)[0])
    if p.op_type == "Concat" and all(i is not None and i.producer() is not None and i.producer().op_type == "ArgMax"
                                     for i in p.inputs):
        return len(p.inputs)
    return None

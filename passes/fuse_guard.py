"""The numerical guard of the `fuse` pass: a fusion is kept only if the fused graph computes what
the graph before it computed.

``NumericGuard`` runs the graph ``fuse`` was given once in ONNX Runtime on the pipeline's sample
inputs (batch 2, a prefill and — for a model with a KV cache — a decode step over past context)
and keeps every output. After a group of rewrites, ``disagreement(model)`` runs the rewritten graph
on the same inputs: each output must agree within fp32 tolerance (``|Δ| ≤ tol · max(1, max|ref|)``,
``tol`` 1e-4 for fp32 outputs, 1e-2 for fp16). The `fuse` pass rolls back the rewrites that fail
and says where: ``locate`` names the first fused node whose own output disagrees with the value it
replaced, and the model layer it belongs to (from the weights upstream of it).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

from llmopt.ort import verify

from llmopt.ort import sessions
from llmopt.errors import first_line

TOLERANCE = {ir.DataType.FLOAT: 1e-4, ir.DataType.FLOAT16: 1e-2, ir.DataType.BFLOAT16: 5e-2}
_LAYER = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?|decoder\.layers)[./_](\d+)(?:[./_]|$)")


@dataclasses.dataclass(frozen=True)
class Disagreement:
    """Why a rewritten graph was refused: the output and its error against the tolerance, or the
    error ONNX Runtime raised on it."""

    output: str
    error: float  # max |Δ| / max(1, max|ref|) (inf when the graph does not run or a shape changed)
    tolerance: float
    message: str

    def __str__(self) -> str:
        return self.message


class NumericGuard:
    """Reference outputs of the graph before fusion, and the check of a rewritten graph against them."""

    def __init__(self, model: ir.Model):
        shapes = verify.default_shapes(verify.has_past_inputs(model))
        self.feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(shapes)]
        self.samples = [dataclasses.asdict(s) for s in shapes]
        self.tolerances = {v.name: TOLERANCE.get(v.dtype, 1e-4) for v in model.graph.outputs}
        self.reference = sessions.run_ir_model(model, self.feeds)  # raises if the input graph cannot run

    def disagreement(self, model: ir.Model) -> Disagreement | None:
        """None if ``model`` agrees with the reference on every sample and output."""
        try:
            outputs = sessions.run_ir_model(model, self.feeds)
        except Exception as exc:  # noqa: BLE001 - the rewritten graph does not load or run: refuse it
            return Disagreement("", float("inf"), 0.0, f"ONNX Runtime cannot run the fused graph ({_ort_message(exc)})")
        worst: Disagreement | None = None
        for ref, out in zip(self.reference, outputs):
            for name, a in ref.items():
                tol = self.tolerances.get(name, 1e-4)
                b = out.get(name)
                if b is None or b.shape != a.shape:
                    got = "missing" if b is None else f"shape {list(b.shape)}"
                    return Disagreement(name, float("inf"), tol, f"output '{name}' is {got}, expected shape {list(a.shape)}")
                err = relative_error(a, b)
                if err > tol and (worst is None or err > worst.error):
                    worst = Disagreement(name, err, tol, f"'{name}' differs by {err:.3g} (relative to its scale) > {tol:g}")
        return worst

    def locate(self, before: ir.Model, after: ir.Model) -> str:
        """The first rewritten node whose output disagrees with the value of the same name before
        the rewrite, as "layer N, <op> '<node>'"; "" when that cannot be told."""
        try:
            named_before = {v.name for n in before.graph for v in n.outputs if v.name}
            unchanged = {_node_key(n) for n in before.graph}
            fused = [n for n in after.graph if _node_key(n) not in unchanged]
            probes = [v.name for n in fused for v in n.outputs[:1] if v.name in named_before]
            if not probes:
                return ""
            ref = _run_with_outputs(before, probes, self.feeds[:1])[0]
            got = _run_with_outputs(after, probes, self.feeds[:1])[0]
            by_output = {n.outputs[0].name: n for n in fused if n.outputs}
            for name in probes:  # graph (topological) order
                a, b = ref.get(name), got.get(name)
                if a is None or b is None or a.shape != b.shape or relative_error(a, b) > 1e-4:
                    node = by_output[name]
                    layer = layer_of(node)
                    return f"{'layer ' + layer + ', ' if layer else ''}{node.op_type} '{node.name}'"
        except Exception:  # noqa: BLE001 - locating is a courtesy; the rollback does not depend on it
            return ""
        return ""


def _node_key(node: ir.Node) -> tuple:
    """A node by what it is and how it is wired (value names), comparable across clones."""
    def value(a):
        v = a.value
        return repr(v) if isinstance(v, (int, float, str, list, tuple)) else type(v).__name__

    attrs = tuple(sorted((k, value(a)) for k, a in node.attributes.items()))
    return (node.domain, node.op_type, attrs, tuple(v.name if v is not None else None for v in node.inputs),
            tuple(v.name for v in node.outputs))


def _ort_message(exc: BaseException) -> str:
    """ONNX Runtime's error without its boilerplate: the node and the status message."""
    text = first_line(exc, 600)
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    status = text.split("Status Message:", 1)[-1].strip()
    return f"{node.group(1)} '{node.group(2)}': {status[:240]}" if node else text[:240]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not (np.isfinite(a64).all() and np.isfinite(b64).all()):
        same = np.array_equal(a64, b64, equal_nan=True)
        return 0.0 if same else float("inf")
    return float(np.abs(a64 - b64).max() / max(1.0, float(np.abs(a64).max())))


def layer_of(node: ir.Node) -> str:
    """The decoder layer a node computes, from the names of the weights upstream of it ('' if none)."""
    seen, frontier = set(), [node]
    for _ in range(64):  # breadth-first, a bounded walk up the graph
        nxt = []
        for n in frontier:
            for v in n.inputs:
                if v is None or id(v) in seen:
                    continue
                seen.add(id(v))
                if v.is_initializer() and v.name:
                    m = _LAYER.search(v.name)
                    if m:
                        return m.group(1)
                if v.producer() is not None:
                    nxt.append(v.producer())
        if not nxt:
            break
        frontier = nxt
    return ""


def _run_with_outputs(model: ir.Model, names: list[str], feeds: list[dict]) -> list[dict]:
    """``model`` (a clone, so the original is untouched) with ``names`` as extra graph outputs, run."""
    probe = model.clone()
    values = {v.name: v for n in probe.graph for v in n.outputs if v.name}
    existing = {v.name for v in probe.graph.outputs}
    for name in names:
        v = values[name]
        if name not in existing and v.type is not None:
            probe.graph.outputs.append(v)
    return sessions.run_ir_model(probe, feeds)

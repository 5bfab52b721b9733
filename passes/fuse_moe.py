"""The `fuse` stage ``moe``: a routed expert block → ``com.microsoft::MoE``.

What is recognized is what the block computes, not one exporter's spelling of it. An expert block
is anchored on its expert weights: two ``Gather``/``GatherND`` of 3-D constants (``[experts, out,
in]`` or ``[experts, in, out]``: fused gate/up, then down, as transformers' ``batched_mm`` experts
export) indexed by one value, the chosen experts. Other expert layouts (separate gate and up
weights, dense-over-experts formulations) are left as exported. Around that anchor:

- the **router** is the nearest linear layer upstream of the indices whose width is the expert
  count; its input is the block's input ``x`` and its output the logits ``MoE`` takes;
- the **routing** (softmax then top-k, top-k then softmax, renormalized or not, Phi-MoE's sparse
  mixer, ...) is the subgraph from the logits to the chosen experts and their weights. It is run in
  ONNX Runtime on random logits and compared with what ``MoE`` itself computes for each of its
  routing modes (a probe ``MoE`` node whose experts return their own one-hot); the mode that
  agrees is the one used, and a block none agrees with is left as it is;
- the **expert MLP**: the first batched MatMul (``fc1``, with its gathered bias), the activation
  subgraph between it and the second (``fc2``), and the weighted sum over the chosen experts. The
  activation subgraph is run on random inputs and matched against SwiGLU (concatenated or
  interleaved gate/up, with the alpha, beta and clamp constants it holds) and the plain
  activations ``MoE`` offers. ONNX Runtime's CPU kernel takes interleaved gate/up rows only, so a
  concatenated layout is re-laid out at fusion.

Shared experts (Qwen2-MoE) and the residual stay as they are: ``MoE`` has no input for them, and
they are dense linears the dense rules quantize. The `fuse` pass's numerical guard then checks the
fused graph as a whole, like every group of rewrites, and rolls the group back if it disagrees.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from llmopt.core.experts import PASS_THROUGH, gathered_constant, gathers_by_index
from llmopt.core.graph_util import add_initializer
from llmopt.passes.fuse_common import MS

_ROUTING_MODES = ({"normalize_routing_weights": 1}, {"normalize_routing_weights": 0},
                  {"normalize_routing_weights": 0, "use_sparse_mixer": 1})
_PROBE_TOKENS = 64
_GRAPH_ROUTING = "graph_routing"  # not an MoE attribute: the graph's own routing feeds the MoE node


@dataclasses.dataclass
class ExpertBlock:
    """One routed expert block as found in the graph: everything ``MoE`` needs."""

    x: ir.Value  # (tokens, hidden): the router's input
    logits: ir.Value  # (tokens, experts)
    output: ir.Value  # (tokens, hidden): the weighted sum over the chosen experts
    fc1: ir.Value  # the gathered weights, as in the graph
    fc1_transposed: bool  # [experts, in, out] rather than [experts, out, in]
    fc1_bias: ir.Value | None
    fc2: ir.Value
    fc2_transposed: bool
    fc2_bias: ir.Value | None
    hidden_in: ir.Value  # fc1's output (after its bias): the activation's input
    hidden_out: ir.Value  # fc2's input: the activation's output
    routing_weights: ir.Value  # what the expert outputs are multiplied by
    indices: ir.Value  # the chosen experts, as the gathers take them


def fuse_moe(model: ir.Model) -> tuple[int, list[str]]:
    """Replace every recognized expert block by one ``MoE`` node: (how many, and for each block
    found but left as exported, why)."""
    fused, notes = 0, []
    for block in find_blocks(model.graph):
        attributes = _attributes(model, block)
        if isinstance(attributes, str):
            notes.append(f"expert block at {block.output.name} left as exported: {attributes}")
            continue
        _replace(model, block, attributes)
        fused += 1
    if fused:
        common_passes.RemoveUnusedNodesPass()(model)
        model.opset_imports.setdefault(MS, 1)
    return fused, notes


# ---------------------------------------------------------------------------------------- finding


def find_blocks(graph: ir.Graph) -> list[ExpertBlock]:
    blocks = []
    for index, nodes in gathers_by_index(graph):
        block = _block([n for n in nodes if n.inputs[0].const_value.shape.rank() == 3], index)
        if block is not None:
            blocks.append(block)
    return blocks


def _through(value: ir.Value) -> ir.Value:
    """Follow a value forward through single-consumer reshapes."""
    while True:
        users = [u for u, _ in value.uses()]
        if len(users) != 1 or users[0].op_type not in PASS_THROUGH or users[0].domain != "":
            return value
        value = users[0].outputs[0]


def _back(value: ir.Value) -> ir.Value:
    """Follow a value backward through reshapes."""
    while (p := value.producer()) is not None and p.op_type in PASS_THROUGH and p.domain == "":
        value = p.inputs[0]
    return value


def _bias_after(value: ir.Value, index: ir.Value) -> tuple[ir.Value, ir.Value | None]:
    """``value`` (through reshapes) plus a gathered 2-D bias indexed by ``index``, if it is added."""
    value = _through(value)
    users = [u for u, _ in value.uses()]
    if len(users) == 1 and users[0].op_type == "Add":
        other = next(v for v in users[0].inputs if v is not value)
        p = other.producer() if other is not None else None
        if p is not None and p.inputs[1] is index and (b := gathered_constant(p)) is not None and len(b.const_value.shape) == 2:
            return users[0].outputs[0], b
    return value, None


def _weights_matmul(gather: ir.Node) -> tuple[ir.Node, bool] | None:
    """The batched MatMul that reads the gathered weights, and whether they are [in, out]."""
    out = _through(gather.outputs[0])
    users = [u for u, _ in out.uses()]
    if len(users) != 1 or users[0].op_type != "MatMul":
        return None
    mm = users[0]
    return mm, mm.inputs[1] is out


def _ancestors(value: ir.Value, limit: int = 400) -> set[int]:
    seen: set[int] = set()
    stack = [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        p = v.producer()
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        stack.extend(i for i in p.inputs if i is not None)
    return seen


def _block(gathers: list[ir.Node], index: ir.Value) -> ExpertBlock | None:
    if len(gathers) != 2:  # fused gate/up and down (transformers' batched_mm); other counts: not yet
        return None
    found = [_weights_matmul(g) for g in gathers]
    if any(f is None for f in found):
        return None
    (mm_a, tr_a), (mm_b, tr_b) = found
    if id(mm_a) in _ancestors(mm_b.outputs[0]):
        (g1, mm1, tr1), (g2, mm2, tr2) = (gathers[0], mm_a, tr_a), (gathers[1], mm_b, tr_b)
    elif id(mm_b) in _ancestors(mm_a.outputs[0]):
        (g1, mm1, tr1), (g2, mm2, tr2) = (gathers[1], mm_b, tr_b), (gathers[0], mm_a, tr_a)
    else:
        return None
    hidden_in, b1 = _bias_after(mm1.outputs[0], index)
    down, b2 = _bias_after(mm2.outputs[0], index)
    hidden_out = _back(mm2.inputs[0] if tr2 else mm2.inputs[1])
    # the weighted sum: Mul by the routing weights, then a ReduceSum over the chosen experts
    down = _through(down)
    users = [u for u, _ in down.uses()]
    if len(users) != 1 or users[0].op_type != "Mul":
        return None
    mul = users[0]
    weights = next(v for v in mul.inputs if v is not down)
    summed = _through(mul.outputs[0])
    users = [u for u, _ in summed.uses()]
    if len(users) != 1 or users[0].op_type != "ReduceSum" or users[0].attributes.get_int("keepdims", 1) != 0:
        return None
    output = users[0].outputs[0]
    router = _router(index)
    if router is None:
        return None
    x, logits = router
    if x.shape is not None and output.shape is not None and len(x.shape) != len(output.shape):
        return None
    return ExpertBlock(x=x, logits=logits, output=output,
                       fc1=g1.inputs[0], fc1_transposed=tr1, fc1_bias=b1,
                       fc2=g2.inputs[0], fc2_transposed=tr2, fc2_bias=b2,
                       hidden_in=hidden_in, hidden_out=hidden_out, routing_weights=weights, indices=index)


def _router(index: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(x, logits): the nearest linear layer upstream of the chosen experts."""
    seen: set[int] = set()
    frontier = [index]
    while frontier:
        nxt = []
        for v in frontier:
            p = v.producer()
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.op_type in ("MatMul", "Gemm") and p.domain == "":
                w = p.inputs[1]
                if w is not None and w.const_value is not None and len(w.const_value.shape) == 2:
                    out = p.outputs[0]
                    users = [u for u, _ in out.uses()]
                    if (len(users) == 1 and users[0].op_type == "Add"
                            and any(i is not out and i is not None and i.const_value is not None for i in users[0].inputs)):
                        out = users[0].outputs[0]
                    return p.inputs[0], out
            nxt.extend(i for i in p.inputs if i is not None and i.const_value is None)
        frontier = nxt
    return None


# ------------------------------------------------------------------------------ numerical probes


def _subgraph_model(model: ir.Model, inputs: list[ir.Value], outputs: list[ir.Value]) -> ir.Model | None:
    try:
        graph = ir.convenience.extract(model.graph, inputs, outputs)
    except ValueError:
        return None
    for v in graph.inputs:
        v.shape = None  # the probes feed their own row counts
    for v in graph.outputs:
        v.shape = None
    return ir.Model(graph, ir_version=model.ir_version)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    from llmopt.ort import sessions

    try:
        out = sessions.run_ir_model(model, [feeds])[0]
    except Exception:  # noqa: BLE001 - a subgraph that does not run on its own is not recognized
        return None
    return [out[v.name] for v in model.graph.outputs]


def _dense_routing(weights: np.ndarray, chosen: np.ndarray, experts: int) -> np.ndarray:
    tokens = chosen.shape[0]
    dense = np.zeros((tokens, experts), np.float64)
    np.add.at(dense, (np.repeat(np.arange(tokens), chosen.shape[1]), chosen.reshape(-1)), weights.reshape(-1))
    return dense


def _routing_mode(model: ir.Model, block: ExpertBlock, experts: int) -> tuple[int, dict] | None:
    """(k, MoE routing attributes) whose routing agrees with the graph's, on random logits.

    When none does (Phi-MoE's sparse mixer as transformers computes it, sigmoid or grouped routers),
    the graph keeps its own routing and ``MoE`` only runs the experts: the chosen experts' weights,
    scattered into a dense ``D`` [tokens, experts], enter as ``log D`` with renormalization, which
    selects exactly those experts with weights ``D / ΣD``; the output is then multiplied by ``ΣD``.
    That needs non-negative weights; other routings are left as exported."""
    sub = _subgraph_model(model, [block.logits], [block.routing_weights, block.indices])
    if sub is None:
        return None
    logits = _probe_logits(experts)
    got = _run(sub, {block.logits.name: logits})
    if got is None:
        return None
    weights, chosen = got
    if chosen.size % _PROBE_TOKENS or weights.size != chosen.size:
        return None
    k = chosen.size // _PROBE_TOKENS
    graph_dense = _dense_routing(weights, chosen.reshape(_PROBE_TOKENS, k).astype(np.int64), experts)
    for mode in _ROUTING_MODES:
        if mode.get("use_sparse_mixer") and k != 2:
            continue
        moe = _moe_routing_probe(experts, k, tuple(sorted(mode.items())))
        if moe is not None and np.allclose(moe, graph_dense, atol=1e-5, rtol=1e-4):
            return k, mode
    if (weights < 0).any():
        return None
    return k, {_GRAPH_ROUTING: 1}


def _probe_logits(experts: int) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((_PROBE_TOKENS, experts)) * 2).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _moe_routing_probe(experts: int, k: int, mode: tuple) -> np.ndarray | None:
    """The dense routing weights ``MoE`` computes from ``_probe_logits(experts)`` in ``mode``:
    experts that return their own one-hot (fc1 = identity, relu of an all-ones input, fc2 = one-hot
    rows). The same for every block of a model, so run once per (experts, k, mode)."""
    logits = _probe_logits(experts)
    tokens = logits.shape[0]
    fc1 = np.broadcast_to(np.eye(experts, dtype=np.float32), (experts, experts, experts)).copy()
    fc2 = np.zeros((experts, experts, experts), np.float32)
    for e in range(experts):
        fc2[e, e, :] = 1.0 / experts
    graph = ir.Graph(
        inputs=[x := ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([tokens, experts])),
                r := ir.Value(name="r", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([tokens, experts]))],
        outputs=[],
        nodes=[],
        opset_imports={"": 17, MS: 1},
    )
    w1 = add_initializer(graph, "fc1", fc1)
    w2 = add_initializer(graph, "fc2", fc2)
    node = ir.node("MoE", [x, r, w1, None, w2], attributes={"k": k, "activation_type": "relu", **dict(mode)}, domain=MS)
    node.outputs[0].name = "y"
    node.outputs[0].dtype = ir.DataType.FLOAT
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    got = _run(ir.Model(graph, ir_version=10), {"x": np.ones((tokens, experts), np.float32), "r": logits})
    return None if got is None else got[0].astype(np.float64)


def _scalars(sub: ir.Model) -> list[float]:
    found = set()
    for node in sub.graph:
        for v in node.inputs:
            if v is not None and v.const_value is not None and v.const_value.size == 1:
                try:
                    found.add(float(v.const_value.numpy().reshape(())))
                except (TypeError, ValueError):
                    pass
    return sorted(found)


def _activation(model: ir.Model, block: ExpertBlock, n1: int, inter: int) -> dict | None:
    """MoE activation attributes (and the gate/up layout) that compute what the graph's do."""
    sub = _subgraph_model(model, [block.hidden_in], [block.hidden_out])
    if sub is None:
        return None
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((_PROBE_TOKENS, n1)) * 4).astype(np.float32)
    got = _run(sub, {block.hidden_in.name: z})
    if got is None or got[0].shape != (_PROBE_TOKENS, inter):
        return None
    want = got[0].astype(np.float64)
    z = z.astype(np.float64)
    sig = lambda t: 0.5 * (1.0 + np.tanh(0.5 * t))  # noqa: E731 - the logistic function, without overflow
    close = lambda a: np.allclose(a, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))  # noqa: E731
    consts = _scalars(sub)
    if n1 == 2 * inter:
        limits = [None] + [c for c in consts if c > 0]
        for layout, (alpha, beta, limit) in itertools.product(
                ("concatenated", "interleaved"),
                itertools.product(sorted({1.0, *consts}), sorted({0.0, *consts}), limits)):
            g, u = (z[:, :inter], z[:, inter:]) if layout == "concatenated" else (z[:, 0::2], z[:, 1::2])
            if limit is not None:
                g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
            if close(g * sig(alpha * g) * (u + beta)):
                attrs = {"activation_type": "swiglu", "swiglu_fusion": 1, "layout": layout}
                if alpha != 1.0:
                    attrs["activation_alpha"] = alpha
                if beta != 0.0:
                    attrs["activation_beta"] = beta
                if limit is not None:
                    attrs["swiglu_limit"] = limit
                return attrs
        return None
    if n1 == inter:
        for name, f in (("silu", lambda t: t * sig(t)), ("relu", lambda t: np.maximum(t, 0)), ("identity", lambda t: t)):
            if close(f(z)):
                return {"activation_type": name}
    return None


# ------------------------------------------------------------------------------------ rewriting


def _attributes(model: ir.Model, block: ExpertBlock) -> dict | str:
    """The ``MoE`` attributes that compute what ``block`` does, or why there are none."""
    fc1 = block.fc1.const_value.shape
    fc2 = block.fc2.const_value.shape
    experts = fc1[0]
    n1 = fc1[2] if block.fc1_transposed else fc1[1]
    inter = fc2[1] if block.fc2_transposed else fc2[2]
    if fc2[0] != experts:
        return f"fc1 has {experts} experts, fc2 {fc2[0]}"
    routing = _routing_mode(model, block, experts)
    if routing is None:
        return ("its routing (logits → chosen experts and weights) does not run on its own, or gives "
                "negative weights")
    activation = _activation(model, block, n1, inter)
    if activation is None:
        return "its expert activation is none MoE's CPU kernel has (SwiGLU, SiLU, ReLU, identity)"
    k, mode = routing
    return {"k": k, **mode, **activation}


def _interleave(rows: np.ndarray, inter: int) -> np.ndarray:
    """[gate rows | up rows] → gate and up rows alternating (axis 1)."""
    out = np.empty_like(rows)
    out[:, 0::2] = rows[:, :inter]
    out[:, 1::2] = rows[:, inter:]
    return out


def _replace(model: ir.Model, block: ExpertBlock, attributes: dict) -> None:
    graph = model.graph
    layout = attributes.pop("layout", None)
    fc1 = block.fc1.const_value.numpy()
    if block.fc1_transposed:
        fc1 = fc1.transpose(0, 2, 1)
    fc2 = block.fc2.const_value.numpy()
    if block.fc2_transposed:
        fc2 = fc2.transpose(0, 2, 1)
    bias1 = block.fc1_bias.const_value.numpy() if block.fc1_bias is not None else None
    if layout == "concatenated":
        inter = fc1.shape[1] // 2
        fc1 = _interleave(fc1, inter)
        bias1 = _interleave(bias1, inter) if bias1 is not None else None
    base = block.fc1.name or "moe"
    inputs = [block.x, block.logits,
              add_initializer(graph, f"{base}.moe_fc1", np.ascontiguousarray(fc1, dtype=np.float32)),
              add_initializer(graph, f"{base}.moe_fc1_bias", bias1.astype(np.float32)) if bias1 is not None else None,
              add_initializer(graph, f"{base}.moe_fc2", np.ascontiguousarray(fc2, dtype=np.float32)),
              block.fc2_bias]
    while inputs[-1] is None:
        inputs.pop()
    routing: list[ir.Node] = []
    if attributes.pop(_GRAPH_ROUTING, None):
        routing, inputs[1], total = _graph_routing(graph, block, attributes["k"])
        attributes["normalize_routing_weights"] = 1
    node = ir.node("MoE", inputs, attributes=attributes, domain=MS, name=f"{block.output.name}_moe")
    nodes = routing + [node]
    out = node.outputs[0]
    if routing:
        nodes.append(scaled := ir.node("Mul", [out, total], name=f"{block.output.name}_moe_scale"))
        out = scaled.outputs[0]
    out.name = f"{block.output.name}_moe"
    out.dtype = block.output.dtype
    out.shape = block.output.shape
    graph.insert_after(block.output.producer(), nodes)
    block.output.replace_all_uses_with(out)
    if block.output in graph.outputs:
        graph.outputs[graph.outputs.index(block.output)] = out


def _graph_routing(graph: ir.Graph, block: ExpertBlock, k: int) -> tuple[list[ir.Node], ir.Value, ir.Value]:
    """Nodes giving ``log D`` (the MoE router input) and ``ΣD`` [tokens, 1] from the graph's own
    chosen experts and weights (see ``_routing_mode``)."""
    name = block.output.name
    shape = add_initializer(graph, f"{name}_moe_k", np.array([-1, k], np.int64))
    axes = add_initializer(graph, f"{name}_moe_axes", np.array([1], np.int64))
    idx = ir.node("Reshape", [block.indices, shape])
    idx64 = ir.node("Cast", [idx.outputs[0]], attributes={"to": ir.DataType.INT64})
    weights = ir.node("Reshape", [block.routing_weights, shape])
    zeros = ir.node("Sub", [block.logits, block.logits])  # a zero of the logits' shape and type
    dense = ir.node("ScatterElements", [zeros.outputs[0], idx64.outputs[0], weights.outputs[0]], attributes={"axis": 1})
    log = ir.node("Log", [dense.outputs[0]])
    total = ir.node("ReduceSum", [dense.outputs[0], axes], attributes={"keepdims": 1})
    nodes = [idx, idx64, weights, zeros, dense, log, total]
    for i, n in enumerate(nodes):
        n.name = f"{name}_moe_routing_{i}"
    return nodes, log.outputs[0], total.outputs[0]

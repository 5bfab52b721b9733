"""Run passes written against onnx-graphsurgeon as llmopt passes.

Usage::

    import onnx_graphsurgeon as gs
    from llmopt.core.graphsurgeon import GraphSurgeonPass, graphsurgeon_pass
    from llmopt.core.registry import register_pass

    @register_pass
    @graphsurgeon_pass("drop-identity")
    def drop_identity(graph: gs.Graph) -> gs.Graph:
        \"\"\"Remove Identity nodes.\"\"\"
        for node in [n for n in graph.nodes if n.op == "Identity"]:
            src, dst = node.inputs[0], node.outputs[0]
            if dst in graph.outputs:
                continue
            for consumer in list(dst.outputs):
                consumer.inputs[consumer.inputs.index(dst)] = src
        return graph.cleanup().toposort()

    # or, with options:
    @register_pass
    class MyPass(GraphSurgeonPass):
        name = "my-pass"
        summary = "..."
        Options = MyOptions          # a frozen dataclass, as for any llmopt pass

        def run_graph(self, graph: gs.Graph) -> gs.Graph:
            ...
            return graph

after which ``--passes drop-identity,cleanup`` (or
``llmopt.run_pipeline(model, "drop-identity")``) runs it like a built-in pass.

How the graph crosses over without loading the weights, and what does not survive the trip:
``llmopt.core.graphsurgeon_bridge``.

``run`` reports a change only if the graph's structure changed (nodes, their
op types, attributes and wiring, graph inputs/outputs, initializers by identity
or, for small inline tensors, by content, opset imports, functions). Node order
alone does not count. When nothing changed the model is left exactly as it was
(the round-tripped copy is dropped). The comparison: ``llmopt.core.graphsurgeon_fingerprint``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

import onnx_ir as ir

from llmopt.core.graphsurgeon_bridge import Bridge
from llmopt.core.graphsurgeon_fingerprint import fingerprint
from llmopt.errors import MissingDependencyError, PipelineError
from llmopt.core.pass_base import NoOptions, Pass

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

__all__ = ["GraphSurgeonPass", "graphsurgeon_pass", "import_graphsurgeon"]

# Tensor bytes that a conversion may have to hold in memory before the pass warns.
LOAD_WARN_BYTES = 1 << 30
# A serialized protobuf message cannot exceed 2 GiB.
PROTOBUF_LIMIT_BYTES = (1 << 31) - 1


def import_graphsurgeon():
    """``onnx_graphsurgeon``, or a MissingDependencyError saying how to install it."""
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        raise MissingDependencyError(
            "onnx-graphsurgeon is needed to run onnx-graphsurgeon passes; "
            "install it with `pip install onnx-graphsurgeon` (or `pip install llmopt[graphsurgeon]`)"
        ) from None
    return gs


class GraphSurgeonPass(Pass):
    """An llmopt pass whose body is an onnx-graphsurgeon function.

    Subclasses set ``name``, ``summary`` (and optionally ``Options``) and implement
    ``run_graph(graph) -> graph``, which may mutate and return ``graph`` or return a
    new ``gs.Graph``. ``run`` does the conversion both ways without loading weights
    (see ``llmopt.core.graphsurgeon_bridge``) and reports whether the graph changed.
    """

    def run_graph(self, graph: "gs.Graph") -> "gs.Graph":  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, model: ir.Model) -> bool:
        gs = import_graphsurgeon()
        bridge = Bridge(model, self.name or type(self).__qualname__)
        proto = bridge.to_proto()
        graph = gs.import_onnx(proto)
        bridge.attach(gs, graph)
        result = self.run_graph(graph)
        if not isinstance(result, gs.Graph):
            raise TypeError(
                f"graphsurgeon pass '{self.name}': run_graph must return an onnx_graphsurgeon Graph "
                f"(e.g. `return graph.cleanup().toposort()`), got {_describe(result)}"
            )
        held = bridge.detach(gs, result)
        if held > LOAD_WARN_BYTES:
            self.warn(
                f"converting the graph back from onnx-graphsurgeon loaded {held} bytes "
                f"({held / (1 << 30):.2f} GiB) of tensor data into memory (constants the pass replaced or "
                f"created go inline), over the {LOAD_WARN_BYTES / (1 << 30):.0f} GiB warning threshold: "
                "the model is too large to convert without loading all weights this way; "
                "leave large constants untouched in run_graph (reading them is fine) or write the pass against onnx_ir"
            )
        if held:
            self.count("bytes_loaded", held)
        estimate = bridge.proto_bytes + held
        if estimate > PROTOBUF_LIMIT_BYTES:
            raise PipelineError(
                f"pass '{self.name}': the graph onnx-graphsurgeon would export holds about {estimate} bytes "
                f"({estimate / (1 << 30):.2f} GiB) of inline data, over protobuf's 2 GiB limit; the model is too "
                "large to convert without keeping its weights external: leave large constants untouched in "
                "run_graph (reading them is fine) or write the pass against onnx_ir"
            )
        new = bridge.from_proto(gs.export_onnx(result))
        self.count("tensors_by_reference", bridge.resolved)
        if fingerprint(new, bridge.refs) == fingerprint(model, bridge.refs):
            return False
        _adopt(model, new)
        return True


def graphsurgeon_pass(
    name: str, summary: str = "", *, options: type | None = None
) -> Callable[[Callable[..., Any]], type[GraphSurgeonPass]]:
    """Decorator: a ``def f(graph) -> graph`` function becomes a GraphSurgeonPass subclass.

    The class is returned, not registered: apply ``llmopt.core.registry.register_pass``
    to it. ``summary`` defaults to the first line of the function's docstring. With
    ``options`` (a frozen dataclass), the function is called as ``f(graph, options)``.
    The function stays available as ``cls.function``.
    """

    def wrap(fn: Callable[..., Any]) -> type[GraphSurgeonPass]:
        doc = inspect.getdoc(fn) or ""
        text = summary or (doc.strip().splitlines()[0] if doc.strip() else "")
        if options is None:

            def run_graph(self, graph):
                return fn(graph)

        else:

            def run_graph(self, graph):
                return fn(graph, self.options)

        run_graph.__doc__ = fn.__doc__
        attrs = {
            "name": name,
            "summary": text,
            "Options": options or NoOptions,
            "run_graph": run_graph,
            "__doc__": fn.__doc__,
            "__module__": fn.__module__,
            "__qualname__": getattr(fn, "__qualname__", fn.__name__),
            "function": staticmethod(fn),
        }
        return type(fn.__name__, (GraphSurgeonPass,), attrs)

    return wrap


def _describe(obj: Any) -> str:
    if obj is None:
        return "None (did run_graph forget to `return graph`?)"
    text = repr(obj)
    return f"{type(obj).__module__}.{type(obj).__qualname__} ({text[:80]}{'...' if len(text) > 80 else ''})"


def _adopt(model: ir.Model, new: ir.Model) -> None:
    """Give ``model`` the contents of ``new`` (the PassManager needs the same Model object)."""
    graph = new.graph
    for key, value in model.graph.metadata_props.items():  # not modeled by onnx-graphsurgeon
        graph.metadata_props.setdefault(key, value)
    model.graph = graph
    model.functions.clear()
    model.functions.update(new.functions)

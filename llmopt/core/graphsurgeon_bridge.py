"""The onnx-graphsurgeon adapter's conversion: onnx_ir -> proto -> gs -> proto -> onnx_ir,
tensors by reference (``llmopt.core.graphsurgeon`` runs the pass around it).

How the graph crosses over, without loading the weights
--------------------------------------------------------
The model is converted onnx_ir -> ``onnx.ModelProto`` -> ``gs.import_onnx``, the
user's ``run_graph`` runs, then ``gs.export_onnx`` -> onnx_ir. No weight is read
on the way:

* Every tensor that is external (``ir.ExternalTensor``, memory-mapped) or larger
  than 1 KiB (in-memory or lazy tensors made by earlier passes, e.g. ``fp16``'s
  lazy casts) is serialized as an *external reference*: a TensorProto with
  ``data_location=EXTERNAL``; for external tensors its location/offset/length are
  those of the original file, for the others it names no real file. Each such
  proto carries a handle (a ``metadata_props`` entry) back to the original
  onnx_ir tensor object. Small in-memory tensors (shape constants, axes) go
  inline, as usual.
* onnx-graphsurgeon wraps initializers and tensor attributes in ``LazyValues``
  and, as long as nobody reads ``Constant.values``, ``export_onnx`` passes the
  original TensorProto through untouched (``OnnxExporter.export_tensor_proto``).
* On the way back each handle is resolved to *the original tensor object*
  (same ``ExternalTensor``, still memory-mapped from the original file and its
  ``base_dir``; same in-memory or lazy tensor), so base directories, several
  data files, and tensors never saved to disk all survive unchanged. Nothing is
  written, and the files the model came from are never modified.
* Reading values is allowed: ``Constant.values`` of a referenced tensor is a
  read-only view (memory-mapped for external tensors) served from the original
  tensor, and a Constant whose values were only read goes back by reference.
  Values that a pass replaces (``const.values = new_array``) or creates are
  new data and go inline. That is the one case that holds tensor bytes in
  memory: past ``LOAD_WARN_BYTES`` (1 GiB) the pass records a warning, and a
  protobuf that would pass protobuf's 2 GiB limit is refused with a
  ``PipelineError`` naming the pass.

Limitations: what onnx-graphsurgeon does not model does not survive a *changed*
graph: value-level ``metadata_props`` and quantization annotations, and ONNX
``TENSORS`` (tensor-list) attributes holding external data. ``graph.fold_constants()``
cannot evaluate subgraphs that read referenced tensors through ONNX Runtime (it
builds an in-memory session that cannot open them; graphsurgeon logs a warning and
leaves them unfolded); folding of small inline constants works. A referenced
tensor's values are read-only; assign a new array to change them.
"""

from __future__ import annotations

import functools
import os
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import onnx_ir as ir

from llmopt.core import model_io
from llmopt.errors import PipelineError

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

# Non-external tensors up to this size go inline in the proto (as in ``llmopt.core.model_io.save``).
INLINE_BYTES = model_io.INLINE_LIMIT_BYTES

_HANDLE_KEY = "llmopt.core.graphsurgeon.handle"


class Bridge:
    """One conversion: onnx_ir -> proto (tensors by reference) -> gs -> proto -> onnx_ir."""

    def __init__(self, model: ir.Model, pass_name: str):
        self.model = model
        self.pass_name = pass_name
        self.token = f"llmopt-graphsurgeon-{uuid.uuid4().hex}/"
        self.handles: list[ir.TensorProtocol] = []
        self.refs: dict[int, int] = {}  # id(original tensor) -> handle
        self.proto_bytes = 0
        self.resolved = 0
        self._loaded: dict[int, tuple[np.ndarray, Any]] = {}

    # ---- onnx_ir -> proto

    def to_proto(self) -> "onnx.ModelProto":
        restore: list[Callable[[], None]] = []
        try:
            for tensor, put, undo in _ir_tensor_slots(self.model):
                if not _by_reference(tensor):
                    continue
                i = self.refs.get(id(tensor))
                if i is None:
                    i = self.refs[id(tensor)] = len(self.handles)
                    self.handles.append(tensor)
                placeholder = ir.ExternalTensor(
                    f"{self.token}{i}", None, None, tensor.dtype,
                    shape=ir.Shape(list(tensor.shape)), name=tensor.name or "",
                )
                restore.append(undo)
                put(placeholder)
            proto = ir.serde.serialize_model(self.model)
        finally:
            for undo in reversed(restore):
                undo()
        for tp in _proto_tensors(proto):
            i = self._token_handle(tp)
            if i is None:
                continue
            original = self.handles[i]
            if isinstance(original, ir.ExternalTensor):  # a real reference to the original file
                del tp.external_data[:]
                _set_external(tp, os.fspath(original.location), original.offset, original.length)
            entry = tp.metadata_props.add()
            entry.key, entry.value = _HANDLE_KEY, str(i)
        self.proto_bytes = proto.ByteSize()
        return proto

    def _token_handle(self, tp) -> int | None:
        import onnx

        if tp.data_location != onnx.TensorProto.EXTERNAL:
            return None
        location = next((e.value for e in tp.external_data if e.key == "location"), "")
        if not location.startswith(self.token):
            return None
        return int(location[len(self.token):])

    # ---- gs side

    def attach(self, gs, graph: "gs.Graph") -> None:
        """Serve each referenced Constant's values from its original tensor."""
        from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

        values_cls = _handle_values_class()
        for const in _gs_constants(gs, graph):
            lazy = const._values
            if not isinstance(lazy, LazyValues) or isinstance(lazy, (SparseValues, values_cls)):
                continue
            i = _proto_handle(lazy.tensor)
            if i is not None:
                const._values = values_cls(lazy.tensor, self.handles[i], self._loaded)

    def detach(self, gs, graph: "gs.Graph") -> int:
        """Constants whose values were only read go back by reference; returns the bytes that go inline."""
        held = 0
        for const in _gs_constants(gs, graph):
            values = const._values
            if isinstance(values, np.ndarray):
                seen = self._loaded.get(id(values))
                if seen is not None and seen[0] is values:
                    const._values = seen[1]
                else:
                    held += values.nbytes
                    # gs would keep data_location=EXTERNAL from the import on what is now inline data
                    const.data_location = None
        return held

    # ---- proto -> onnx_ir

    def from_proto(self, proto: "onnx.ModelProto") -> ir.Model:
        for tp in _proto_tensors(proto):
            i = _proto_handle(tp)
            if i is None:
                continue
            original = self.handles[i]
            if list(tp.dims) != [int(d) for d in original.shape] or tp.data_type != original.dtype.value:
                raise PipelineError(
                    f"pass '{self.pass_name}': tensor '{tp.name}' changed shape or type while keeping the data of "
                    f"'{original.name}' (was its TensorProto edited directly?); assign new values instead"
                )
            kept = [e for e in tp.metadata_props if e.key != _HANDLE_KEY]
            del tp.metadata_props[:]
            tp.metadata_props.extend(kept)
            del tp.external_data[:]
            _set_external(tp, f"{self.token}{i}", None, None)
        new = ir.serde.deserialize_model(proto)
        for tensor, put, _ in list(_ir_tensor_slots(new)):
            if isinstance(tensor, ir.ExternalTensor) and os.fspath(tensor.location).startswith(self.token):
                original = self.handles[int(os.fspath(tensor.location)[len(self.token):])]
                put(original)
                self.resolved += 1
        return new


def _by_reference(tensor) -> bool:
    if tensor is None or isinstance(tensor, ir.StringTensor) or tensor.dtype == ir.DataType.STRING:
        return False
    return isinstance(tensor, ir.ExternalTensor) or tensor.nbytes > INLINE_BYTES


def _set_external(tp, location: str, offset: int | None, length: int | None) -> None:
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = tp.external_data.add()
            entry.key, entry.value = key, str(value)


def _proto_handle(tp) -> int | None:
    for entry in tp.metadata_props:
        if entry.key == _HANDLE_KEY:
            return int(entry.value)
    return None


_VALUES_CLS: type | None = None


def _handle_values_class() -> type:
    """A gs ``LazyValues`` that loads from the original onnx_ir tensor (read-only, no copy)."""
    global _VALUES_CLS
    if _VALUES_CLS is None:
        from onnx_graphsurgeon.ir.tensor import LazyValues

        class TensorRefValues(LazyValues):
            def __init__(self, proto, source, loaded: dict):
                super().__init__(proto)
                self.source = source
                self._registry = loaded

            def load(self) -> np.ndarray:
                array = np.asarray(self.source.numpy()).view()
                array.flags.writeable = False
                self._registry[id(array)] = (array, self)  # detach() recognizes it if it comes back as is
                return array

            def __str__(self):
                return f"TensorRefValues (shape={self.shape}, dtype={self.dtype}, by reference)"

        _VALUES_CLS = TensorRefValues
    return _VALUES_CLS


# --------------------------------------------------------------------------- walkers


def _ir_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    yield model.graph
    yield from model.graph.subgraphs()
    for function in model.functions.values():
        yield from function.subgraphs()


def _ir_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from model.graph.all_nodes()
    for function in model.functions.values():
        yield from function.all_nodes()


def _ir_tensor_slots(model: ir.Model) -> Iterator[tuple[Any, Callable[[Any], None], Callable[[], None]]]:
    """(tensor, put, undo) for every initializer and tensor attribute.

    ``put(t)`` makes ``t`` the tensor there; ``undo()`` restores what was there when yielded.
    """
    for graph in _ir_graphs(model):
        for value in graph.initializers.values():

            def put(t, value=value):
                value.const_value = t

            yield value.const_value, put, functools.partial(put, value.const_value)
    for node in list(_ir_nodes(model)):
        for key, attr in list(node.attributes.items()):
            if attr.is_ref() or attr.type != ir.AttributeType.TENSOR:
                continue

            def put(t, node=node, key=key, doc=attr.doc_string):
                node.attributes[key] = ir.AttrTensor(key, t, doc_string=doc)

            def undo(node=node, key=key, attr=attr):
                node.attributes[key] = attr

            yield attr.value, put, undo


def _proto_tensors(model: "onnx.ModelProto") -> Iterator["onnx.TensorProto"]:
    def nodes(protos):
        for node in protos:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                if attr.HasField("g"):
                    yield from graph(attr.g)
                for g in attr.graphs:
                    yield from graph(g)

    def graph(g):
        yield from g.initializer
        yield from nodes(g.node)

    yield from graph(model.graph)
    for function in model.functions:
        yield from nodes(function.node)


def _gs_constants(gs, graph: "gs.Graph") -> Iterator["gs.Constant"]:
    graphs = [graph, *graph.subgraphs(recursive=True)]
    for function in graph.functions:
        graphs += [function, *function.subgraphs(recursive=True)]
    seen: set[int] = set()
    for g in graphs:
        candidates = [t for t in g.tensors().values() if isinstance(t, gs.Constant)]
        for node in g.nodes:
            candidates += [a for a in node.attrs.values() if isinstance(a, gs.Constant)]
        for const in candidates:
            if id(const) not in seen:
                seen.add(id(const))
                yield const

"""A model on disk and back: load (weights stay memory-mapped, the graph checked), save (always
external data), the files a model is made of and their digest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx_ir as ir

from llmopt.errors import InputError, first_line

MODEL_FILE = "model.onnx"
DATA_SUFFIX = ".data"
# Tensors below this size stay inline: ORT needs small constants (axes, shapes)
# in the protobuf to infer shapes at load time. Weights always go to .data.
INLINE_LIMIT_BYTES = 1024


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The .onnx file a user means by ``path`` (a file, or a directory holding model.onnx)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory; check the path")
    if p.is_dir():
        candidate = p / MODEL_FILE
        if candidate.is_file():
            return candidate
        onnx_files = sorted(p.glob("*.onnx"))
        if len(onnx_files) == 1:
            return onnx_files[0]
        if (p / "config.json").is_file():
            raise InputError(
                f"{p}: is a Hugging Face model directory, not an ONNX model; "
                "run `llmopt export` on it first (or pass it to `llmopt compile`, which exports it)"
            )
        what = "several .onnx files" if onnx_files else "no model.onnx"
        raise InputError(f"{p}: directory holds {what}; pass the .onnx file itself")
    return p


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model; external tensors stay memory-mapped and are only read on use.

    Raises ``InputError`` for anything that is not a complete ONNX model.
    """
    p = resolve_model_file(path)
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"{p}: file is empty; re-export or re-download the model")
    try:
        import onnx

        proto = onnx.load(str(p), load_external_data=False)  # as onnx_ir.load does, keeping the proto to check
        _check_unique_initializers(proto, p)
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, p.parent)
    except InputError:
        raise
    except Exception as exc:  # protobuf raises DecodeError, onnx_ir raises several kinds
        raise InputError(
            f"{p}: not a valid ONNX model ({type(exc).__name__}: {first_line(exc, 200)}); "
            "the file may be truncated or of another format"
        ) from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise InputError(f"{p}: ONNX file holds an empty graph; the file may be truncated")
    check_graph(model, p)
    check_external_data(model, p)
    if size <= ROUND_TRIP_LIMIT_BYTES:
        _check_types(proto, p)
        try:  # what loads must save: damage protobuf lets through (e.g. strings that are not UTF-8) shows here
            ir.serde.serialize_model(model)
        except Exception as exc:  # noqa: BLE001 - onnx_ir's SerdeError wraps the cause
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise InputError(f"{p}: not a valid ONNX model ({type(cause).__name__}: {first_line(cause, 200)}); "
                             "the file is damaged — re-export the model") from None
    return model


def _check_types(proto, path: Path) -> None:
    """ONNX's type and shape inference in strict mode (on the graph only: weights are not read).

    Where it finds an inconsistency ONNX Runtime has the last word: the model is refused only if
    ONNX Runtime cannot load it either (so a graph ONNX's inference gets wrong is still accepted)."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        return
    except Exception:  # noqa: BLE001 - onnx raises InferenceError, ValidationError, ...
        pass
    from llmopt.ort.verify import make_session  # verify imports this module

    make_session(path, optimization="disable")  # raises the one-line InputError when ORT refuses it too


# Graphs up to this size are serialized once at load to prove they can be written back (a copy of the
# graph and its inline tensors; external weights are references and cost nothing).
ROUND_TRIP_LIMIT_BYTES = 256 * 2**20


# Ops that ONNX Runtime registers in the default ONNX domain although ONNX does not define them.
ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def _check_unique_initializers(proto, path: Path) -> None:
    seen: set[str] = set()
    for t in proto.graph.initializer:
        if t.name in seen:
            raise InputError(f"{path}: initializer {t.name!r} is defined twice; the file is damaged — re-export the model")
        seen.add(t.name)


def check_graph(model: ir.Model, path: Path) -> None:
    """What every pass assumes of its input, checked once at load (no tensor bytes are read):

    the graph has outputs; the default-domain opset is a released one and each of its ops exists
    there with only the attributes it defines; every value a node reads is defined (a graph input,
    an initializer, a node's output — nothing missing) and the graph has no cycle; inline
    tensors hold as many bytes as their dtype and shape say.
    """
    import onnx

    if not model.graph.outputs:
        raise InputError(f"{path}: the graph has no outputs; the file is damaged — re-export the model")
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    newest = onnx.defs.onnx_opset_version()
    if version is not None and not 1 <= version <= newest:
        raise InputError(f"{path}: imports ONNX opset {version}; this ONNX knows opsets 1 to {newest} — "
                         "export the model with a released opset")
    _check_scope(model.graph, set(model.graph.inputs) | set(model.graph.initializers.values()), version, path)
    for value in model.graph.initializers.values():
        t = value.const_value
        raw = getattr(t, "raw", None)
        if raw is not None and hasattr(raw, "raw_data") and raw.raw_data and len(raw.raw_data) != t.nbytes:
            raise InputError(f"{path}: initializer {value.name} holds {len(raw.raw_data)} bytes but its dtype "
                             f"{t.dtype.name} and shape {list(t.shape)} need {t.nbytes}; the file is damaged — re-export the model")


def _check_scope(graph, defined: set, version: int | None, path: Path) -> None:
    import onnx

    for node in graph:
        where = f"{path}: node {node.name or '?'} ({node.op_type or 'no op type'})"
        if not node.op_type:
            raise InputError(f"{where} has no op type; the file is damaged — re-export the model")
        if node.domain in ("", "ai.onnx") and version is not None and node.op_type not in ORT_DEFAULT_DOMAIN_OPS:
            try:
                schema = onnx.defs.get_schema(node.op_type, version, "")
            except Exception:  # onnx.defs.SchemaError
                raise InputError(f"{where}: no such ONNX operator at opset {version}; "
                                 "the file is damaged or needs another opset") from None
            extra = set(node.attributes) - set(schema.attributes)
            if extra:
                raise InputError(f"{where}: attribute {sorted(extra)[0]!r} is not defined for {node.op_type} at opset "
                                 f"{version}; the file is damaged or needs another opset")
    produced = {v for node in graph for v in node.outputs}
    for node in graph:
        for v in node.inputs:
            if v is not None and v not in defined and v not in produced:
                raise InputError(f"{path}: node {node.name or '?'} ({node.op_type}) reads {v.name!r}, which nothing "
                                 "defines (a missing initializer or input); the file is damaged — re-export the model")
        for attr in node.attributes.values():
            subgraphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
            for sub in subgraphs:
                _check_scope(sub, defined | produced | set(sub.inputs) | set(sub.initializers.values()), version, path)
    _check_acyclic(graph, path)


def _check_acyclic(graph, path: Path) -> None:
    """Kahn's algorithm over this graph's nodes (an unsorted but acyclic graph is fine: ORT sorts it)."""
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    waiting = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in index:
                waiting[i] += 1
                users[index[id(p)]].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if done < len(nodes):
        stuck = next(nodes[i] for i, w in enumerate(waiting) if w > 0)
        raise InputError(f"{path}: the graph has a cycle (through node {stuck.name or '?'} ({stuck.op_type})); "
                         "the file is damaged — re-export the model")


def external_tensors(model: ir.Model):
    """(where, tensor) for every tensor whose bytes live in an external file: initializers and
    tensor attributes (Constant values), in every graph and subgraph."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.name, value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    yield f"{node.name or node.op_type}.{attr.name}", attr.value


def check_external_data(model: ir.Model, path: Path) -> None:
    """Every external tensor's file must lie in the model's folder, exist and be long enough.

    Reads no tensor bytes, and nothing outside the folder: a location that is absolute or climbs
    out (``../secret.bin``) is refused before any file is opened, as ONNX Runtime refuses it.
    """
    sizes: dict[Path, int] = {}
    for name, tensor in external_tensors(model):
        location = str(tensor.location)
        norm = os.path.normpath(location)
        if os.path.isabs(location) or norm == ".." or norm.startswith(".." + os.sep) or location.startswith(("/", "\\")):
            raise InputError(
                f"{path}: tensor {name} points at external data outside the model's folder ({location}); "
                "only files beside the .onnx are read — move the data next to it and fix the location"
            )
        data = Path(tensor.path)
        if data not in sizes:
            if not data.is_file():
                raise InputError(
                    f"{path}: external data file {location} is missing (needed by {name}); "
                    "keep it next to the .onnx file"
                )
            sizes[data] = data.stat().st_size
        offset = tensor.offset or 0
        end = offset + (tensor.length if tensor.length is not None else tensor.nbytes)
        if offset < 0 or end > sizes[data]:
            raise InputError(
                f"{path}: external data file {location} is truncated ({sizes[data]} bytes, "
                f"{name} needs {end}); re-export the model"
            )
        if tensor.length is not None and tensor.length != tensor.nbytes:
            raise InputError(f"{path}: tensor {name} declares {tensor.length} bytes of external data but its "
                             f"dtype and shape need {tensor.nbytes}; the file is damaged — re-export the model")


def save(model: ir.Model, path: str | os.PathLike, progress=None, data_name: str | None = None) -> Path:
    """Save ``model`` to ``path`` with every tensor over 1 KiB in ``<path>.data`` (or ``data_name``
    beside it).

    ``progress(done, total)`` is called once per tensor written.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    done = 0

    def counted(_tensor, info):  # may run on worker threads, serialized: count calls
        nonlocal done
        done += 1
        progress(done, info.total)

    ir.save(model, p, external_data=data_name or p.name + DATA_SUFFIX, size_threshold_bytes=INLINE_LIMIT_BYTES,
            callback=counted if progress is not None else None)
    return p


def model_files(path: str | os.PathLike, model: ir.Model | None = None) -> list[Path]:
    """The .onnx file and the external data files it references (in order of first use)."""
    p = resolve_model_file(path)
    files = [p]
    if model is None:
        model = load(p)
    for _, t in external_tensors(model):
        f = Path(t.path)
        if f not in files:
            files.append(f)
    return files


def sha256_files(files: list[Path], chunk: int = 1 << 22) -> str:
    """Streaming sha256 over the files, in order (constant memory)."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def files_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)

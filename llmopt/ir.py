"""IR helpers on top of onnx_ir: load (weights stay memory-mapped), save (always
external data), and statistics that never read tensor bytes."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
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
    from llmopt.verify import make_session  # verify imports this module

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
    callback = None
    if progress is not None:

        done = 0

        def callback(_tensor, info):  # may run on worker threads, serialized: count calls
            nonlocal done
            done += 1
            progress(done, info.total)

    ir.save(model, p, external_data=data_name or p.name + DATA_SUFFIX, size_threshold_bytes=INLINE_LIMIT_BYTES, callback=callback)
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


def tensor_numel(value: ir.Value) -> int:
    shape = value.shape if value.shape is not None else value.const_value.shape
    n = 1
    for d in shape:
        n *= int(d)
    return n


def parameter_stats(model: ir.Model) -> dict[str, dict[str, int]]:
    """Parameter count and bytes per dtype, from initializer metadata only."""
    stats: dict[str, dict[str, int]] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        n = 1
        for d in tensor.shape:
            n *= int(d)
        entry = stats.setdefault(tensor.dtype.name.lower(), {"count": 0, "bytes": 0})
        entry["count"] += n
        entry["bytes"] += tensor.nbytes
    return stats


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def op_histogram(model: ir.Model) -> dict[str, int]:
    counts = Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type) for n in model.graph.all_nodes()
    )
    return dict(counts.most_common())


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def dim_str(d) -> str | int:
    return int(d) if isinstance(d, int) else str(d)


def io_signature(model: ir.Model) -> dict[str, list[dict]]:
    def describe(v: ir.Value) -> dict:
        return {
            "name": v.name,
            "dtype": v.dtype.name.lower() if v.dtype is not None else None,
            "shape": [dim_str(d) for d in v.shape] if v.shape is not None else None,
        }

    return {
        "inputs": [describe(v) for v in model.graph.inputs],
        "outputs": [describe(v) for v in model.graph.outputs],
    }


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` at ``new``; a graph output keeps its name (names are the interface)."""
    was_output, name = old.is_graph_output(), old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        old.name = None
        new.name = name


def drop_unused_initializers(graph: ir.Graph) -> int:
    """Remove initializers nothing reads (the originals a pass replaced); returns how many."""
    dead = [name for name, v in graph.initializers.items()
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input()]
    for name in dead:
        del graph.initializers[name]
    return len(dead)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name`` (suffixed ``_1``, ``_2``, ... if the name is taken)."""
    taken = set(graph.initializers) | {v.name for v in graph.inputs} | {v.name for n in graph for v in n.outputs}
    base, i = name, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value



def gqa_head_dim(node: ir.Node) -> int | None:
    """A GroupQueryAttention's head size, from its query width (packed Q/K/V, or Q alone)."""
    heads, kv_heads = node.attributes["num_heads"].as_int(), node.attributes["kv_num_heads"].as_int()
    dims = known_shape(node.inputs[0]) if node.inputs[0] is not None else None
    width = dims[-1] if dims else None
    if not isinstance(width, int):
        return None
    return width // (heads + 2 * kv_heads) if len(node.inputs) < 2 or node.inputs[1] is None else width // heads


_SAME_SHAPE = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
               "SkipLayerNormalization", "RotaryEmbedding", "Identity", "Cast"}


def known_shape(v: ir.Value, depth: int = 6) -> list | None:
    """``v``'s dims (ints where known), from its shape or, when shape inference left none (outputs of
    contrib ops and of rewrites), through shape-preserving ops and a Reshape to a constant shape."""
    if v.shape is not None:
        return list(v.shape)
    node = v.producer()
    if node is None or depth == 0 or not node.inputs or node.inputs[0] is None:
        return None
    if node.op_type in _SAME_SHAPE and v is node.outputs[0]:
        return known_shape(node.inputs[0], depth - 1)
    if node.op_type == "Reshape" and len(node.inputs) > 1 and node.inputs[1] is not None \
            and node.inputs[1].const_value is not None:
        src = known_shape(node.inputs[0], depth - 1)
        target = [int(d) for d in node.inputs[1].const_value.numpy().reshape(-1)]
        if src is None or target.count(-1) > 1:
            return None
        dims = [src[i] if d == 0 and i < len(src) else d for i, d in enumerate(target)]
        if -1 in dims:  # the dims after the copied/fixed ones fold into -1
            i = dims.index(-1)
            rest = src[i:] if all(d == 0 for d in target[:i]) and i == len(target) - 1 else None
            dims[i] = int(np.prod(rest)) if rest and all(isinstance(d, int) for d in rest) else None
        return dims
    return None


def cache_dims(past: ir.Value) -> tuple[int, int] | None:
    """(kv_heads, head_dim) of a past-KV input: from its shape when fixed, else from the
    GroupQueryAttention that reads it (onnxruntime-genai's builder leaves ``head_size`` symbolic)."""
    shape = past.shape
    if shape is not None and len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[3], int):
        return int(shape[1]), int(shape[3])
    for use in past.uses():
        node = use.node
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and use.idx in (3, 4):
            head_dim = gqa_head_dim(node)
            if head_dim is not None:
                return node.attributes["kv_num_heads"].as_int(), head_dim
    return None

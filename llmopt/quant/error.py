"""How far a quantized weight is from the float one, and the per-weight record every quantizing
pass leaves in the model.

Every quantizing pass records, per float weight it quantizes, the relative RMS error of the
dequantized weight ``‖W_deq − W‖ / ‖W‖`` (measured while that one tensor is in memory, in chunks),
merged into ``model.metadata_props[QUANT_ERROR_KEY]`` as JSON
``{weight name: {"rel_rmse", "pass", "bits", "method", "block_size"[, "scope"]}}``; the compile
manifest reports it. ``method`` is ``rtn`` or ``gptq``; ``block_size`` is null for per-channel,
per-row or per-tensor scales; ``scope`` is the module that reads the weight when the exporter
recorded it (torch.onnx names transposed weights ``val_NN``; the report places them in their layer
by it). A weight quantized twice (tied embeddings, two copies) keeps the larger error.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from llmopt.quant.spec import QUANT_ERROR_KEY, blocks

_ERROR_CHUNK = 1 << 20  # elements per chunk when measuring an error (bounded temporaries)


def rel_rmse(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """``‖deq − ref‖ / ‖ref‖`` over ``(ref, deq)`` chunks of one tensor (sums in float64)."""
    err = norm = 0.0
    for ref, deq in pairs:
        ref = np.asarray(ref, np.float64)
        d = np.asarray(deq, np.float64) - ref
        err += float(np.vdot(d, d))
        norm += float(np.vdot(ref, ref))
    return math.sqrt(err / norm) if norm > 0 else 0.0


def _chunks(rows: int, row_elements: int) -> list[slice]:
    step = max(1, _ERROR_CHUNK // max(1, row_elements))
    return [slice(i, i + step) for i in range(0, rows, step)]


def block_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero, block: int) -> float:
    """Relative RMS error of MatMulNBits-layout blocks against ``w`` [K, N]: ``q`` [N, n_blocks, block]
    integers, ``scale`` [N, n_blocks] (or flat), ``zero`` [N, n_blocks] or a scalar. Padding rows
    dequantize to 0, so the padded layout measures the error of ``w`` itself."""
    n, nb = q.shape[0], q.shape[1]
    scale = np.reshape(scale, (n, nb, 1))
    zero = np.reshape(zero, (n, nb, 1)) if np.ndim(zero) else zero

    def pairs():
        for s in _chunks(n, nb * block):
            z = zero[s] if np.ndim(zero) else zero
            yield blocks(w[:, s], block), (q[s].astype(np.float32) - z) * scale[s]

    return rel_rmse(pairs())


def dense_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero=0) -> float:
    """Relative RMS error of ``(q - zero) * scale`` against ``w`` (same 2-D shape); ``scale`` and ``zero``
    broadcast: per tensor, per column ([1, C] or [C]) or per row ([R, 1])."""
    rows = w.shape[0]
    scale = np.asarray(scale, np.float32)

    def pick(a, s):
        return a[s] if np.ndim(a) == w.ndim and np.shape(a)[0] == rows else a

    def pairs():
        for s in _chunks(rows, w[0].size):
            yield w[s], (q[s].astype(np.float32) - pick(zero, s)) * pick(scale, s)

    return rel_rmse(pairs())


def module_scope(node: ir.Node) -> str | None:
    """The module a node came from, as torch.onnx records it (``model.layers.0.mlp.down_proj``), or None."""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list):
        return None
    modules = [str(x) for x in scopes[:-1] if x]  # the last entry names the op, not a module
    return modules[-1] if modules else None


class ErrorLog:
    """One pass run's quantization errors, merged into the model's metadata by ``write``."""

    def __init__(self, pass_name: str):
        self.pass_name = pass_name
        self.entries: dict[str, dict] = {}

    def record(self, name: str, error: float, bits: int, method: str, block_size: int | None,
               node: ir.Node | None = None) -> None:
        entry = {"rel_rmse": round(float(error), 6), "pass": self.pass_name, "bits": int(bits), "method": method,
                 "block_size": None if block_size is None else int(block_size)}
        scope = module_scope(node) if node is not None else None
        if scope:
            entry["scope"] = scope
        old = self.entries.get(name)
        if old is None or entry["rel_rmse"] > old["rel_rmse"]:
            self.entries[name] = entry

    def write(self, model: ir.Model, warn) -> None:
        """Merge into the model's metadata (an earlier pass's entries stay)."""
        if not self.entries:
            return
        try:
            merged = json.loads(model.metadata_props.get(QUANT_ERROR_KEY) or "{}")
        except ValueError:
            merged = None
        if not isinstance(merged, dict):
            warn(f"metadata {QUANT_ERROR_KEY} was not a JSON object; replaced")
            merged = {}
        merged.update(self.entries)
        model.metadata_props[QUANT_ERROR_KEY] = json.dumps(merged)

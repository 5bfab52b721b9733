"""What llmopt's own fusion rules share: the contrib-op domain and readers of constants and dims."""

from __future__ import annotations

import onnx_ir as ir

MS = "com.microsoft"


def const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(a) for a in value.const_value.numpy().reshape(-1)]


def same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim) and a.value is not None and a.value == b.value

"""Lowering: one function per ONNX Runtime kernel, from a quantized weight to the nodes that
compute with it. Each returns the new nodes (the last gives the result); the caller swaps them in
(``QuantEdit.replace_site`` / ``replace_node``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llmopt.quant.edit import QuantEdit
from llmopt.quant.sites import MS_DOMAIN, LinearSite
from llmopt.quant.tensor import QTensor


def _k_n(site: LinearSite) -> tuple[int, int]:
    rows, cols = site.weight.const_value.shape
    return (cols, rows) if site.transposed else (rows, cols)


def pack_nbits(q: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """MatMulNBits layout: B uint8 [N, n_blocks, block*bits/8] (low nibble first for 4 bits);
    zero points uint8 [N, ceil(n_blocks*bits/8)], or None when symmetric (the kernel's default
    zero point, 2^(bits-1), is what ``QuantSpec`` uses for symmetric unsigned types)."""
    q = q.astype(np.uint8)
    packed = (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4) if bits == 4 else q
    if symmetric:
        return np.ascontiguousarray(packed), None
    z = zero.astype(np.uint8)
    if bits == 4:
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
        z = (z[:, 0::2] & 0x0F) | ((z[:, 1::2] & 0x0F) << 4)
    return np.ascontiguousarray(packed), np.ascontiguousarray(z)


def matmul_nbits(edit: QuantEdit, site: LinearSite, qt: QTensor, accuracy_level: int,
                 packed: tuple[np.ndarray, np.ndarray | None] | None = None, b: ir.Value | None = None) -> list[ir.Node]:
    """``com.microsoft::MatMulNBits`` (4 or 8 bits, blockwise; alpha folded into the scales).
    ``packed`` / ``b``: the packed weight when the caller already made it (or its initializer)."""
    spec = qt.spec
    bits = 4 if spec.dtype.endswith("4") else 8
    k, n = _k_n(site)
    data, zp = packed or pack_nbits(qt.q, qt.zero, bits, spec.symmetric)
    b = b or edit.initializer(f"{site.name}_q{bits}", data)
    inputs = [site.activation, b, edit.initializer(f"{site.name}_scales", (qt.scale * np.float32(site.alpha)).reshape(-1).astype(np.float32))]
    if zp is not None:
        inputs.append(edit.initializer(f"{site.name}_zero_points", zp))
    if site.bias is not None:
        inputs += [None] * (4 - len(inputs)) + [None, site.bias]  # zero points slot, g_idx, then the bias
    return [ir.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=f"{site.node.name or 'matmul'}_q{bits}",
                    attributes={"K": k, "N": n, "bits": bits, "block_size": spec.block_size,
                                "accuracy_level": accuracy_level})]


def dynamic_quantize_matmul(edit: QuantEdit, site: LinearSite, qt: QTensor) -> list[ir.Node]:
    """``com.microsoft::DynamicQuantizeMatMul``: int8 weights (per channel or tensor), the activation
    quantized per tensor at run time."""
    scale = (qt.scale.reshape(-1) * np.float32(site.alpha)).astype(np.float32)
    inputs = [site.activation, edit.initializer(f"{site.name}_int8", qt.signed), edit.initializer(f"{site.name}_scale", scale)]
    if site.bias is not None:
        inputs += [None, site.bias]  # no zero point (symmetric), then the bias
    return [ir.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, name=f"{site.node.name or 'matmul'}_dq")]


def quantize_dequantize(edit: QuantEdit, a: ir.Value, scale: np.ndarray, zero: np.ndarray, dtype) -> list[ir.Node]:
    """``QuantizeLinear → DequantizeLinear`` of activation ``a`` (inserted by the caller)."""
    s = edit.initializer(f"{a.name}_scale", np.array(scale, np.float32))
    z = edit.initializer(f"{a.name}_zero_point", np.array(zero, dtype))
    q = ir.node("QuantizeLinear", [a, s, z], name=f"{a.name}_quantize")
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{a.name}_dequantize")
    dq.outputs[0].shape, dq.outputs[0].type = a.shape, a.type
    return [q, dq]


def qdq_matmul(edit: QuantEdit, site: LinearSite, qt: QTensor, activation: ir.Value) -> list[ir.Node]:
    """``DequantizeLinear(W_int8) → MatMul(activation, ·) [→ Add(bias)]`` (alpha folded into the scales)."""
    scale = (np.reshape(qt.scale, -1 if qt.spec.granularity == "channel" else ()) * np.float32(site.alpha)).astype(np.float32)
    wq = edit.initializer(f"{site.name}_int8", qt.signed)
    ws = edit.initializer(f"{site.name}_scale", scale)
    wz = edit.initializer(f"{site.name}_zero_point", np.zeros(scale.shape, np.int8))
    attrs = {"axis": 1} if qt.spec.granularity == "channel" else {}
    wdq = ir.node("DequantizeLinear", [wq, ws, wz], attributes=attrs, name=f"{site.name}_dequantize")
    mm = ir.node("MatMul", [activation, wdq.outputs[0]], name=f"{site.node.name or 'matmul'}_qdq")
    if site.bias is None:
        return [wdq, mm]
    return [wdq, mm, ir.node("Add", [mm.outputs[0], site.bias], name=f"{site.node.name or 'matmul'}_bias")]


def gather_rows(edit: QuantEdit, node: ir.Node, table: ir.Value, qt: QTensor) -> list[ir.Node]:
    """Standard ops any execution provider runs: ``Gather(int8 rows) → Cast → Mul(Gather(row scales))``."""
    scale = np.broadcast_to(qt.scale, (qt.q.shape[0], 1)).astype(np.float32)
    base, ids = table.name or "embedding", node.inputs[1]
    q_init = edit.initializer(f"{base}_int8", qt.signed)
    s_init = edit.initializer(f"{base}_row_scale", scale)
    g_q = ir.node("Gather", [q_init, ids], attributes={"axis": 0}, name=f"{node.name}_q")
    cast = ir.node("Cast", [g_q.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{node.name}_cast")
    g_s = ir.node("Gather", [s_init, ids], attributes={"axis": 0}, name=f"{node.name}_scale")
    return [g_q, cast, g_s, ir.node("Mul", [cast.outputs[0], g_s.outputs[0]], name=f"{node.name}_dequant")]


def gather_block_quantized(edit: QuantEdit, node: ir.Node, table: ir.Value, qt: QTensor,
                           packed: tuple[np.ndarray, np.ndarray | None], shared: ir.Value | None = None) -> list[ir.Node]:
    """``com.microsoft::GatherBlockQuantized`` over the table's own packed rows ``[V, H·bits/8]``
    (``quantize_axis=1``), or over ``shared``, a tied lm_head's MatMulNBits weight
    ``[V, n_blocks, block·bits/8]`` (``quantize_axis=2``, then a Reshape back to ``[..., H]``)."""
    spec, (v, h) = qt.spec, table.const_value.shape
    bits, nb = (4 if spec.dtype.endswith("4") else 8), qt.q.shape[1]
    base, ids, data, zp = table.name or "embedding", node.inputs[1], packed[0], packed[1]
    attrs = {"gather_axis": 0, "block_size": spec.block_size, "bits": bits}
    name = f"{node.name or 'gather'}_q{bits}"
    if shared is None:
        inputs = [edit.initializer(f"{base}_gq{bits}", data), ids, edit.initializer(f"{base}_gather_scales", qt.scale.astype(np.float32))]
        if zp is not None:
            inputs.append(edit.initializer(f"{base}_gather_zero_points", zp))
        return [ir.node("GatherBlockQuantized", inputs, domain=MS_DOMAIN, name=name, attributes={**attrs, "quantize_axis": 1})]
    inputs = [shared, ids, edit.initializer(f"{base}_gather_scales", qt.scale.reshape(v, nb, 1).astype(np.float32))]
    if zp is not None:  # one zero point a byte along the (single-block) quantize axis
        inputs.append(edit.initializer(f"{base}_gather_zero_points", qt.zero.astype(np.uint8).reshape(v, nb, 1)))
    gbq = ir.node("GatherBlockQuantized", inputs, domain=MS_DOMAIN, name=name, attributes={**attrs, "quantize_axis": 2})
    shape = edit.initializer(f"{base}_gather_shape", np.array([0] * len(ids.shape) + [h], np.int64))
    return [gbq, ir.node("Reshape", [gbq.outputs[0], shape], name=f"{node.name or 'gather'}_rows")]

"""`llmopt inspect`: what a model holds, from its graph and tensor metadata only
(external weights are never read)."""

from __future__ import annotations

import os
from typing import Any

import onnx_ir as ir

from llmopt.core import experts, graph_util, model_io

_BYTES = {ir.DataType.FLOAT: 4, ir.DataType.FLOAT16: 2, ir.DataType.BFLOAT16: 2, ir.DataType.INT8: 1, ir.DataType.UINT8: 1}


def kv_cache_info(model: ir.Model) -> dict[str, Any] | None:
    """Layers, KV heads, head dim and bytes per token (per sequence) of the cache inputs."""
    past = [v for v in model.graph.inputs if v.name.startswith("past_key_values") and v.shape is not None]
    if not past:
        return None
    per_token = 0
    kv_heads, head_dims = set(), set()
    for v in past:
        dims = list(v.shape)
        if len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
            return {"tensors": len(past), "bytes_per_token": None, "note": "cache dims are not static"}
        kv_heads.add(dims[1])
        head_dims.add(dims[3])
        per_token += dims[1] * dims[3] * _BYTES.get(v.dtype, 4)
    return {
        "layers": len(past) // 2,
        "kv_heads": sorted(kv_heads)[0] if len(kv_heads) == 1 else sorted(kv_heads),
        "head_dim": sorted(head_dims)[0] if len(head_dims) == 1 else sorted(head_dims),
        "dtype": past[0].dtype.name.lower(),
        "bytes_per_token": per_token,
    }


def tensor_sparsity(model: ir.Model, min_elements: int = 4096) -> dict[str, float]:
    """Fraction of exact zeros in every float initializer of ``min_elements`` or more (reads each
    tensor once, one at a time; memory-mapped weights are not all loaded together)."""
    out = {}
    for name, value in model.graph.initializers.items():
        t = value.const_value
        if t is None or t.size < min_elements or not t.dtype.is_floating_point():
            continue
        out[name] = round(float((t.numpy() == 0).mean()), 6)
    return out


def inspect_model(path: str | os.PathLike, sparsity: bool = False) -> dict[str, Any]:
    """A summary of the model at ``path`` as a JSON-ready dict; ``sparsity`` reads the weights."""
    file = model_io.resolve_model_file(path)
    model = model_io.load(file)
    params = graph_util.parameter_stats(model)
    files = model_io.model_files(file, model)
    return {
        "path": str(file),
        "files": {str(f.name): f.stat().st_size for f in files},
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "nodes": graph_util.node_count(model),
        "ops": graph_util.op_histogram(model),
        "parameters": {
            "count": sum(p["count"] for p in params.values()),
            "bytes": sum(p["bytes"] for p in params.values()),
            "by_dtype": params,
            "experts": experts.parameter_split(model),
        },
        "io": graph_util.io_signature(model),
        "kv_cache": kv_cache_info(model),
        "metadata": dict(model.metadata_props),
        "sparsity": tensor_sparsity(model) if sparsity else None,
    }


def format_inspection(info: dict[str, Any]) -> str:
    """A readable text rendering of ``inspect_model``'s dict."""
    from llmopt.reporting.format import human_bytes, human_count

    lines = [f"{info['path']}", f"  files: " + ", ".join(f"{k} ({human_bytes(v)})" for k, v in info["files"].items())]
    lines.append(f"  opsets: " + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opsets"].items()))
    p = info["parameters"]
    lines.append(f"  parameters: {human_count(p['count'])} in {human_bytes(p['bytes'])}")
    for dt, e in p["by_dtype"].items():
        lines.append(f"    {dt:<10} {human_count(e['count']):>10}  {human_bytes(e['bytes']):>10}")
    moe = p.get("experts")
    if moe:
        k = "/".join(map(str, moe["k"])) or "?"
        e = "/".join(map(str, moe["experts"]))
        lines.append(f"  mixture of experts: {moe['blocks']} blocks of {e} experts, top-{k}; experts hold "
                     f"{human_count(moe['expert_count'])} ({human_bytes(moe['expert_bytes'])})")
        lines.append(f"  active per token: {human_count(moe['active_count'])} parameters "
                     f"({human_bytes(moe['active_bytes'])}) of {human_count(p['count'])}"
                     + (f"; k unknown in {moe['k_unknown_blocks']} blocks (counted whole)" if moe["k_unknown_blocks"] else ""))
    lines.append("  inputs:")
    for v in info["io"]["inputs"]:
        lines.append(f"    {v['name']:<32} {v['dtype']:<8} {v['shape']}")
    lines.append("  outputs:")
    for v in info["io"]["outputs"]:
        lines.append(f"    {v['name']:<32} {v['dtype']:<8} {v['shape']}")
    kv = info["kv_cache"]
    if kv and kv.get("bytes_per_token"):
        lines.append(
            f"  kv cache: {kv['layers']} layers x {kv['kv_heads']} kv heads x {kv['head_dim']} head dim, "
            f"{kv['dtype']} -> {human_bytes(kv['bytes_per_token'])}/token per sequence"
        )
    else:
        lines.append("  kv cache: none (no past_key_values inputs)")
    if info.get("sparsity") is not None:
        sparse = {k: v for k, v in info["sparsity"].items() if v > 0}
        lines.append(f"  sparsity: {len(sparse)} of {len(info['sparsity'])} float weights have zeros")
        for name, frac in sorted(sparse.items()):
            lines.append(f"    {name:<48} {frac:.2%}")
    lines.append(f"  nodes: {info['nodes']}")
    for op, n in info["ops"].items():
        lines.append(f"    {op:<36} {n}")
    return "\n".join(lines)

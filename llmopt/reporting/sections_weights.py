"""The report's sections on the weights: per-layer quantization error and sparsity, as bars by layer
(or by tensor, when the names carry no layer index) and a table. Manifest in, document blocks out."""

from __future__ import annotations

import json
import re
import statistics
from typing import Any, Callable

from llmopt.reporting.document import Bars, Cell, Note, Section, Table, cell
from llmopt.reporting.format import fmt_fixed, fmt_num, fmt_pct
from llmopt.reporting.manifest import is_number

_LAYER_WORDS = {"layers", "layer", "h", "blocks", "block"}
_LAYER_GLUED = re.compile(r"^(?:layers|layer|h|blocks|block)[_-]?(\d+)$")


def layer_index(name: str) -> int | None:
    """The layer a weight belongs to: the first integer path component after 'layers' or 'h'
    (``model.layers.3.mlp.down_proj.weight`` -> 3, ``transformer.h.0.attn.c_attn.weight`` -> 0,
    ``/model/layers_2/...`` -> 2); None for weights outside the layers (embeddings, lm_head)."""
    parts = [p for p in re.split(r"[./:]", name) if p]
    for i, part in enumerate(parts):
        if part.lower() in _LAYER_WORDS and i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
        m = _LAYER_GLUED.match(part.lower())
        if m:
            return int(m.group(1))
    return None


def _natural_key(name: str) -> list:
    """'val_57' before 'val_249': digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


_MAX_TENSOR_BARS = 48


def _bars_by_layer(entries: list[tuple[str, int | None, float]], fmt: Callable[[float], str], unit: str,
                   what: str) -> tuple[Bars, str]:
    """Bars of the mean value per layer index (then 'other' for weights outside the layers) and a note on
    what they show. When most names carry no layer index (torch.onnx names many weights ``val_57``),
    one bar per tensor instead, in name order."""
    with_layer = sum(1 for _, li, _ in entries if li is not None)
    if with_layer * 2 >= len(entries):
        groups: dict[int | None, list[float]] = {}
        for _, li, v in entries:
            groups.setdefault(li, []).append(v)
        keys = sorted(k for k in groups if k is not None) + ([None] if None in groups else [])
        means = [statistics.fmean(groups[k]) for k in keys]
        texts = [f"{fmt(mv)} ({len(groups[k])} weight{'' if len(groups[k]) == 1 else 's'})" for mv, k in zip(means, keys)]
        labels = [f"layer {k}" if k is not None else "other" for k in keys]
        note = f"Bars: mean {what} per layer" + (" (weights outside the layers: 'other')." if None in groups else ".")
        return Bars(labels, means, texts, unit=unit, title=f"mean {what} per layer"), note
    ordered = sorted(entries, key=lambda e: _natural_key(e[0]))
    shown = ordered[:_MAX_TENSOR_BARS]
    example = min((n for n, li, _ in entries if li is None), key=len)
    note = (f"Bars: {what} per tensor, in name order — {len(entries) - with_layer} of {len(entries)} weight names "
            f"carry no layer index (e.g. `{example}`), so they cannot be grouped by layer"
            + (f"; the first {_MAX_TENSOR_BARS} shown." if len(ordered) > _MAX_TENSOR_BARS else "."))
    labels = [n if li is None else f"{n} (layer {li})" for n, li, _ in shown]
    return Bars(labels, [v for _, _, v in shown], [fmt(v) for _, _, v in shown], unit=unit,
                title=f"{what} per tensor"), note


def _layer_cell(li: int | None) -> Cell:
    return cell("-" if li is None else li, "num")


def quant_layer(name: str, rec: dict) -> int | None:
    """A quantized weight's layer: the record's own ``layer``, else one in its ``scope``/``node`` name, else its name."""
    if isinstance(rec.get("layer"), int) and is_number(rec["layer"]):
        return rec["layer"]
    for key in ("scope", "module", "node"):
        if isinstance(rec.get(key), str) and layer_index(rec[key]) is not None:
            return layer_index(rec[key])
    return layer_index(name)


def quantization(m: dict) -> Section:
    title = "Per-layer quantization error"
    qe = m.get("quantization_error")
    if not qe:
        return Section("quantization", title, [Note(
            "The manifest has no quantization_error: no pass in this pipeline recorded per-weight quantization "
            "error (the pipeline does not quantize weights, or its passes do not record it).", "muted")])
    entries: list[tuple[str, float, dict]] = []
    for name, rec in (qe.items() if isinstance(qe, dict) else []):
        if isinstance(rec, dict) and is_number(rec.get("rel_rmse")):
            entries.append((str(name), float(rec["rel_rmse"]), rec))
        elif is_number(rec):
            entries.append((str(name), float(rec), {}))
    if not entries:
        return Section("quantization", title, [Note("quantization_error holds no rel_rmse figures.", "warn")])
    bars, bars_note = _bars_by_layer([(n, quant_layer(n, r), v) for n, v, r in entries], fmt_num,
                                     "relative RMSE", "relative RMSE")
    worst = sorted(entries, key=lambda e: (-e[1], e[0]))[:10]
    rows: list[list[Cell | str]] = []
    for name, v, rec in worst:
        li = quant_layer(name, rec)
        details = ", ".join(f"{k}={'-' if v2 is None else v2}" for k, v2 in rec.items() if k not in ("rel_rmse", "pass"))
        rows.append([cell(name, "code"), _layer_cell(li), cell(rec.get("pass", "-"), "code"),
                     cell(fmt_num(v, 4), "num"), cell(details or "", "small")])
    vals = [v for _, v, _ in entries]
    passes = sorted({str(r.get("pass")) for _, _, r in entries if r.get("pass")})
    blocks: list[Any] = [
        Note(f"{len(entries)} quantized weights{' by ' + ', '.join(passes) if passes else ''}: relative RMSE "
             f"‖W_deq − W‖ / ‖W‖ mean {fmt_num(statistics.fmean(vals), 4)}, "
             f"median {fmt_num(statistics.median(vals), 4)}, max {fmt_num(max(vals), 4)}. {bars_note}"),
        bars,
        Table([f"worst {len(worst)} tensors", "layer", "pass", "rel_rmse", "details"], rows, "lrlrl"),
    ]
    return Section("quantization", title, blocks)


def sparsity(m: dict) -> Section | None:
    sp = m.get("sparsity")
    if not sp:
        return None
    title = "Sparsity"
    if not isinstance(sp, dict) or not all(is_number(v) for v in sp.values()):
        pairs = sp.items() if isinstance(sp, dict) else [("sparsity", sp)]
        rows = [[cell(k, "code"), cell(json.dumps(v), "small")] for k, v in pairs]
        return Section("sparsity", title, [Table(["key", "value"], rows, "ll")])
    items = sorted(((str(k), float(v)) for k, v in sp.items()),
                   key=lambda e: (layer_index(e[0]) is None, layer_index(e[0]) or 0, _natural_key(e[0])))
    bars, bars_note = _bars_by_layer([(n, layer_index(n), v * 100) for n, v in items], lambda v: fmt_fixed(v, 1, "%"),
                                     "% zeros", "share of zeros")
    vals = [v for _, v in items]
    limit = 40
    rows = [[cell(n, "code"), _layer_cell(layer_index(n)), cell(fmt_pct(v, False, 1), "num")]
            for n, v in items[:limit]]
    blocks: list[Any] = [
        Note(f"{len(items)} pruned weights: zeros mean {fmt_pct(statistics.fmean(vals), False, 1)}, "
             f"min {fmt_pct(min(vals), False, 1)}, max {fmt_pct(max(vals), False, 1)}. {bars_note}"),
        bars,
        Table(["tensor", "layer", "zeros"], rows, "lrr"),
    ]
    if len(items) > limit:
        blocks.append(Note(f"… and {len(items) - limit} more tensors (see llmopt.json).", "muted"))
    return Section("sparsity", title, blocks)

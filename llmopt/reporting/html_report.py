"""`llmopt report`: an artifact's manifest (and optionally a bench report) as one HTML page or Markdown.

The HTML is a single self-contained file: inline CSS, plots drawn here as inline SVG, no
scripts and nothing fetched from the network, so it can be attached to a PR or a CI run as is.
Both formats are rendered from the same list of sections, so they always say the same things.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from llmopt.errors import InputError
from llmopt.compiler import preflight
from llmopt.core.atomic import write_atomic
from llmopt.reporting.files import human_bytes, load_json

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#bab0ac")


# --------------------------------------------------------------------------- formatting


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def fmt_num(v: float | int | None, digits: int = 4) -> str:
    """A number for a table: ints as is, floats to ``digits`` significant figures, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}"


def fmt_signed(v: float | int | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:+d}"
    return f"{v:+.{digits}g}"


def fmt_bytes_delta(d: int | None) -> str:
    if d is None:
        return "-"
    if d == 0:
        return "0"
    return ("+" if d > 0 else "-") + human_bytes(abs(d))


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}x"


def fmt_pct(v: float | None, signed: bool = True) -> str:
    return "-" if v is None else (f"{v:+.2%}" if signed else f"{v:.2%}")


def split_op(op: str) -> tuple[str, str]:
    """'com.microsoft::GroupQueryAttention' -> ('GroupQueryAttention', 'com.microsoft')."""
    domain, sep, name = op.rpartition("::")
    return (name, domain) if sep else (op, "")


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


# --------------------------------------------------------------------------- SVG plots


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5, 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.5 or 1.0
        lo, hi = (lo - pad if lo < 0 else max(0.0, lo - pad)), hi + pad
    span = hi - lo
    mag = 10 ** math.floor(math.log10(span / max(n, 1)))
    step = mag
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if span / step <= n:
            break
    if integer:
        step = max(1.0, round(step))
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    count = int(round((end - start) / step))
    return [start + i * step for i in range(count + 1)]


def _tick_label(v: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(v) or 1.0
    biggest = max(abs(t) for t in ticks)
    if biggest >= 1e6 or (biggest < 1e-3 and biggest > 0):
        return f"{v:.2g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:  # 2.5, 0.25 ...
        decimals += 1
    return f"{v:.{decimals}f}"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_SVG_STYLE = {  # presentation attributes, so a chart copied out of the page still looks right; the page CSS overrides them
    "grid": 'stroke="#e6e9ed"', "axis": 'stroke="#8c959f"', "tick": 'fill="#656d76"', "axis-label": 'fill="#656d76"',
    "label": 'fill="#1f2328"', "value": 'fill="#1f2328"',
}


def _svg_open(width: float, height: float, title: str, kind: str) -> list[str]:
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="12" role="img" '
           f'aria-label="{esc(title or kind)}">']
    if title:
        out.append(f"<title>{esc(title)}</title>")
    return out


def _svg_line(x1: float, y1: float, x2: float, y2: float, cls: str) -> str:
    return f'<line class="{cls}" {_SVG_STYLE[cls]} x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"/>'


def _svg_text(x: float, y: float, text: str, cls: str, anchor: str = "start", extra: str = "") -> str:
    return (f'<text class="{cls}" {_SVG_STYLE[cls]} x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>'
            f"{esc(text)}</text>")


def svg_hbar_chart(labels: Sequence[str], values: Sequence[float], *, unit: str = "",
                   value_labels: Sequence[str] | None = None, width: int = 720, bar_height: int = 18,
                   color: str = PALETTE[0], title: str = "") -> str:
    """A horizontal bar chart: one labelled bar per value, an x axis with ticks at the bottom."""
    vals = [max(0.0, float(v)) if v is not None and math.isfinite(v) else 0.0 for v in values]
    texts = list(value_labels) if value_labels is not None else [f"{v:.4g}{unit}" for v in vals]
    shown = [_truncate(str(lab), 34) for lab in labels]
    label_w = min(270, max(60, 7.5 * max((len(s) for s in shown), default=4) + 14))
    right = 8 + 7 * max((len(t) for t in texts), default=4)
    gap, top = 6, 8
    plot_w = max(120, width - label_w - right)
    ticks = nice_ticks(0.0, max(vals, default=0.0) or 1.0)
    xmax = ticks[-1] or 1.0
    plot_h = len(vals) * (bar_height + gap)
    height = top + plot_h + 36

    def x(v: float) -> float:
        return label_w + plot_w * v / xmax

    out = _svg_open(width, height, title, "bar chart")
    for t in ticks:
        out.append(_svg_line(x(t), top, x(t), top + plot_h, "grid"))
        out.append(_svg_text(x(t), top + plot_h + 14, _tick_label(t, ticks), "tick", "middle"))
    for i, (full, lab, v, txt) in enumerate(zip(labels, shown, vals, texts)):
        y = top + i * (bar_height + gap) + gap / 2
        w = max(0.0, x(v) - label_w)
        out.append(_svg_text(label_w - 6, y + bar_height * 0.7, lab, "label", "end"))
        out.append(f'<rect x="{label_w:.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar_height}" fill="{color}">'
                   f"<title>{esc(full)}: {esc(txt)}</title></rect>")
        out.append(_svg_text(label_w + w + 4, y + bar_height * 0.7, txt, "value"))
    out.append(_svg_line(label_w, top + plot_h, label_w + plot_w, top + plot_h, "axis"))
    out.append(_svg_line(label_w, top, label_w, top + plot_h, "axis"))
    if unit.strip():
        out.append(_svg_text(label_w + plot_w / 2, height - 4, unit.strip(), "axis-label", "middle"))
    out.append("</svg>")
    return "".join(out)


def svg_line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, xlabel: str = "",
                   ylabel: str = "", width: int = 720, height: int = 320, title: str = "") -> str:
    """A line chart: one line (with point markers) per (name, xs, ys), axes with ticks, labels, a legend."""
    points = [(name, [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)])
              for name, xs, ys in series]
    xs_all = [x for _, pts in points for x, _ in pts]
    ys_all = [y for _, pts in points for _, y in pts]
    left, right, top = 64, 18, 12
    bottom = 44 + 18 * len(points)  # axis labels, then one legend row per series
    plot_w, plot_h = width - left - right, max(80, height - top - bottom)
    height = top + plot_h + bottom
    integer_x = all(x.is_integer() for x in xs_all)
    xt = nice_ticks(min(xs_all, default=0.0), max(xs_all, default=1.0), 8, integer=integer_x)
    ylo = min(ys_all, default=0.0)
    yt = nice_ticks(0.0 if ylo >= 0 else ylo, max(ys_all, default=1.0) or 1.0, 5)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(v: float) -> float:
        return left + plot_w * (v - x0) / ((x1 - x0) or 1)

    def py(v: float) -> float:
        return top + plot_h - plot_h * (v - y0) / ((y1 - y0) or 1)

    out = _svg_open(width, height, title, "line chart")
    for t in yt:
        out.append(_svg_line(left, py(t), left + plot_w, py(t), "grid"))
        out.append(_svg_text(left - 6, py(t) + 4, _tick_label(t, yt), "tick", "end"))
    for t in xt:
        out.append(_svg_line(px(t), top, px(t), top + plot_h, "grid"))
        out.append(_svg_text(px(t), top + plot_h + 15, _tick_label(t, xt), "tick", "middle"))
    out.append(_svg_line(left, top + plot_h, left + plot_w, top + plot_h, "axis"))
    out.append(_svg_line(left, top, left, top + plot_h, "axis"))
    if xlabel:
        out.append(_svg_text(left + plot_w / 2, top + plot_h + 32, xlabel, "axis-label", "middle"))
    if ylabel:
        cy = top + plot_h / 2
        out.append(_svg_text(14, cy, ylabel, "axis-label", "middle", f' transform="rotate(-90 14 {cy:.1f})"'))
    for i, (name, pts) in enumerate(points):
        color = PALETTE[i % len(PALETTE)]
        if len(pts) > 1:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                       + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts) + '"/>')
        if len(pts) <= 200:  # markers (with a hover tooltip) while they stay distinguishable
            for x, y in pts:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}">'
                           f"<title>{esc(name)}: {esc(fmt_num(x))} → {esc(fmt_num(y))}</title></circle>")
        ly = top + plot_h + 50 + 18 * i
        out.append(f'<line x1="{left}" y1="{ly - 4}" x2="{left + 22}" y2="{ly - 4}" stroke="{color}" stroke-width="3"/>')
        out.append(_svg_text(left + 28, ly, name, "label"))
    out.append("</svg>")
    return "".join(out)


_SPARK = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def sparkline(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    return "".join(_SPARK[0 if hi == lo else min(7, int((v - lo) / (hi - lo) * 8))] for v in vals)


def ascii_bars(labels: Sequence[str], values: Sequence[float], texts: Sequence[str], width: int = 40) -> str:
    vals = [max(0.0, v) if v is not None and math.isfinite(v) else 0.0 for v in values]
    top = max(vals, default=0.0) or 1.0
    lw = max((len(str(lab)) for lab in labels), default=0)
    lines = []
    for lab, v, t in zip(labels, vals, texts):
        eighths = round(v / top * width * 8)
        bar = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
        lines.append(f"{str(lab).ljust(lw)}  {bar.ljust(width)}  {t}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the document model


@dataclasses.dataclass
class Cell:
    text: str
    cls: str = ""  # css class: pass, fail, up, down, muted, code
    tip: str = ""  # hover text (HTML only)


@dataclasses.dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell | str]]
    align: str = ""  # one letter per column, 'l' or 'r'; missing: 'l'
    caption: str = ""
    foot: list[Cell | str] | None = None  # a totals row


@dataclasses.dataclass
class Bars:
    labels: list[str]
    values: list[float]
    texts: list[str]
    unit: str = ""
    title: str = ""


@dataclasses.dataclass
class Lines:
    series: list[tuple[str, list[float], list[float]]]
    xlabel: str
    ylabel: str
    title: str = ""


@dataclasses.dataclass
class Note:
    text: str
    kind: str = "note"  # note, warn, fail, muted


@dataclasses.dataclass
class Items:
    items: list[str]
    kind: str = ""


@dataclasses.dataclass
class Card:
    label: str
    value: str
    sub: str = ""
    cls: str = ""


@dataclasses.dataclass
class Cards:
    cards: list[Card]


@dataclasses.dataclass
class Section:
    id: str
    title: str
    blocks: list[Any]


def _c(text: Any, cls: str = "", tip: str = "") -> Cell:
    return Cell(str(text), cls, tip)


def _signed_cell(d: float | int | None, text: str | None = None, good_when_negative: bool = True) -> Cell:
    if d is None or d == 0:
        return _c(text if text is not None else ("0" if d == 0 else "-"), "muted" if d == 0 else "")
    better = (d < 0) == good_when_negative
    return _c(text if text is not None else fmt_signed(d), "good" if better else "bad")


# --------------------------------------------------------------------------- sections


def check_bench(bench: Any, where: str = "bench report") -> dict[str, Any]:
    if not isinstance(bench, dict) or not isinstance(bench.get("models"), dict) or not isinstance(bench.get("settings"), dict):
        raise InputError(f"{where}: not an llmopt bench report (no 'settings' and 'models'); "
                         f"write one with `llmopt bench ART --json > bench.json`")
    return bench


def _check_manifest(manifest: Any, where: str = "manifest") -> dict[str, Any]:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifact"), dict) or "target" not in manifest:
        raise InputError(f"{where}: not an llmopt manifest (no 'artifact' and 'target'); compile a model first")
    return manifest


def _target_name(m: dict) -> str:
    t = m.get("target")
    return str(t.get("name", "?")) if isinstance(t, dict) else str(t)


def default_title(manifest: dict) -> str:
    src = (manifest.get("source") or {}).get("path") or "model"
    return f"llmopt report: {Path(str(src)).name} → {_target_name(manifest)}"


def _header(m: dict, artifact_dir: str | None) -> Section:
    t = m.get("target") if isinstance(m.get("target"), dict) else {"name": m.get("target")}
    src = m.get("source") or {}
    mach = m.get("machine") or {}
    a = m.get("artifact") or {}
    rows: list[list[Cell | str]] = [
        ["target", _c(f"{t.get('name', '?')}" + (f" — {t['description']}" if t.get("description") else ""))],
        ["provider", _c(m.get("provider") or t.get("provider") or "-", "code")],
    ]
    src_bits = [str(src.get("path", "-"))]
    extra = [str(src["kind"])] if src.get("kind") else []
    if src.get("bytes") is not None:
        extra.append(human_bytes(src["bytes"]))
    if src.get("sha256"):
        extra.append(f"sha256 {str(src['sha256'])[:12]}…")
    rows.append(["source", _c(src_bits[0] + (f" ({', '.join(extra)})" if extra else ""), "code", str(src.get("sha256", "")))])
    if artifact_dir is not None:
        rows.append(["artifact", _c(artifact_dir, "code")])
    files = a.get("files") or {}
    if files:
        rows.append(["files", _c(", ".join(f"{k} {human_bytes(v)}" for k, v in files.items()), "code")])
    rows.append(["pipeline", _c(m.get("pipeline") or t.get("pipeline") or "-", "code")])
    rows.append(["created", _c(m.get("created", "-"))])
    if m.get("seconds") is not None:
        rows.append(["compile time", _c(f"{m['seconds']} s")])
    rows.append(["llmopt version", _c(m.get("llmopt_version", "-"))])
    if mach:
        rows.append(["machine", _c(" · ".join(str(mach[k]) for k in ("cpu", "platform") if mach.get(k))
                                   + (f" · Python {mach['python']}" if mach.get("python") else ""))])
    return Section("overview", "Overview", [Table(["", ""], rows, "ll")])


def _summary(m: dict) -> Section:
    a = m.get("artifact") or {}
    src = m.get("source") or {}
    speed = m.get("speed") or None
    acc = m.get("accuracy") or None
    ver = m.get("verification") or None
    kv = m.get("kv_cache") or None
    cards = []
    ratio = a.get("size_ratio")
    cards.append(Card("size", fmt_ratio(ratio) if ratio is not None else "-",
                      f"{human_bytes(a.get('bytes'))} vs {human_bytes(src.get('bytes'))} source",
                      "good" if ratio is not None and ratio < 1 else ""))
    if speed:
        sp = speed.get("speedup")
        cards.append(Card("single-token speedup", fmt_ratio(sp),
                          f"{fmt_num(speed.get('source_ms'))} → {fmt_num(speed.get('compiled_ms'))} ms",
                          "good" if sp and sp > 1 else "bad" if sp and sp < 1 else ""))
    else:
        cards.append(Card("single-token speedup", "-", "not measured (compile with speed measurement)", "muted"))
    if acc:
        ch = acc.get("perplexity_change")
        cards.append(Card("perplexity change", fmt_pct(ch),
                          f"{fmt_num(acc.get('source_perplexity'))} → {fmt_num(acc.get('compiled_perplexity'))}",
                          "good" if ch is not None and ch <= 0.01 else "bad" if ch is not None and ch > 0.05 else ""))
    else:
        cards.append(Card("perplexity change", "-", "not measured (compile with --eval-text)", "muted"))
    if ver:
        f = ver.get("figures") or {}
        cards.append(Card("verification", "PASS" if ver.get("passed") else "FAIL",
                          f"cosine {fmt_num(f.get('cosine'), 6)}, top-1 {fmt_num(f.get('top1'))}",
                          "pass" if ver.get("passed") else "fail"))
    else:
        cards.append(Card("verification", "skipped", "compiled with --no-verify", "muted"))

    rows: list[list[Cell | str]] = []
    sb, ab = src.get("bytes"), a.get("bytes")
    rows.append(["size (graph + weights)", _c(human_bytes(sb), "num"), _c(human_bytes(ab), "num"),
                 _c(fmt_ratio(ratio) if ratio is not None else "-", "num good" if ratio is not None and ratio < 1 else "num")])
    sn, an = a.get("source_nodes"), a.get("nodes")
    if an is not None:
        d = an - sn if sn is not None else None
        pct = f" ({d / sn:+.0%})" if d is not None and sn else ""
        cell = _signed_cell(d, fmt_signed(d) + pct if d is not None else None)
        cell.cls += " num"
        rows.append(["nodes", _c(fmt_num(sn), "num"), _c(fmt_num(an), "num"), cell])
    if kv:
        rows.append(["KV cache per token", _c("-", "num"), _c(human_bytes(kv.get("bytes_per_token")), "num"),
                     _c(f"{kv.get('layers', '?')} layers × {kv.get('kv_heads', '?')} heads × {kv.get('head_dim', '?')}, "
                        f"{kv.get('dtype', '?')}", "muted")])
    if speed:
        sp = speed.get("speedup")
        rng = ""
        if speed.get("speedup_min") is not None:
            rng = f" ({fmt_num(speed.get('speedup_min'), 3)}–{fmt_num(speed.get('speedup_max'), 3)})"
        rows.append(["single-token latency (ms)", _c(fmt_num(speed.get("source_ms")), "num"),
                     _c(fmt_num(speed.get("compiled_ms")), "num"),
                     _c(f"{fmt_ratio(sp)} speedup{rng}", "num " + ("good" if sp and sp > 1 else "bad" if sp else ""))])
    else:
        rows.append(["single-token latency (ms)", _c("-", "num"), _c("-", "num"), _c("not measured", "muted")])
    if acc:
        ch = acc.get("perplexity_change")
        rows.append([f"perplexity ({acc.get('tokens', '?')} tokens)", _c(fmt_num(acc.get("source_perplexity")), "num"),
                     _c(fmt_num(acc.get("compiled_perplexity")), "num"),
                     _c(fmt_pct(ch), "num " + ("bad" if ch and ch > 0 else "good" if ch is not None else ""))])
    else:
        rows.append(["perplexity", _c("-", "num"), _c("-", "num"), _c("not measured (--eval-text)", "muted")])
    blocks: list[Any] = [Cards(cards), Table(["", "source", "artifact", "change"], rows, "lrrr")]
    if speed and speed.get("what"):
        blocks.append(Note(f"Speed: {speed['what']}; median of {speed.get('pairs', '?')} alternating pairs, "
                           f"{speed.get('threads', '?')} threads.", "muted"))

    if ver:
        f = ver.get("figures") or {}
        th = ver.get("thresholds") or {}
        limits = {"max_abs": ("max_abs", "≤"), "cosine": ("min_cosine", "≥"), "top1": ("min_top1", "≥")}
        names = {"max_abs": "logits max |Δ|", "mean_abs": "logits mean |Δ|", "cosine": "logits cosine",
                 "top1": "top-1 agreement", "other_max_abs": "other outputs max |Δ| (e.g. present KV)"}
        vrows: list[list[Cell | str]] = []
        for key, val in f.items():
            lim_key, op = limits.get(key, (None, ""))
            lim = th.get(lim_key) if lim_key else None
            if lim is None:
                res = _c("-", "muted")
            else:
                ok = val <= lim if op == "≤" else val >= lim
                res = _c("ok" if ok else "miss", "pass" if ok else "fail")
            vrows.append([names.get(key, key), _c(fmt_num(val, 6), "num"),
                          _c(f"{op} {fmt_num(lim, 6)}" if lim is not None else "-", "num"), res])
        blocks.append(Table(["verification figure", "value", "threshold", "result"], vrows, "lrrl",
                            caption=f"Verification: {'PASS' if ver.get('passed') else 'FAIL'} "
                                    f"on {ver.get('provider', '?')}, {len(ver.get('samples') or [])} samples"))
        for miss in ver.get("misses") or []:
            blocks.append(Note(f"miss: {miss}", "fail"))
    else:
        blocks.append(Note("Verification was skipped (--no-verify): the compiled logits were not compared with the "
                           "source's.", "warn"))
    gates = m.get("gates") or []
    if gates:
        grows: list[list[Cell | str]] = [
            [g["gate"], _c(fmt_num(g.get("value")), "num"), _c(fmt_num(g.get("limit")), "num"),
             _c("PASS" if g["passed"] else "FAIL", "pass" if g["passed"] else "fail"), g.get("text", "")]
            for g in gates]
        blocks.append(Table(["gate", "measured", "limit", "result", ""], grows, "lrrll",
                            caption=f"Gates: {'all passed' if all(g['passed'] for g in gates) else 'MISSED'}"))
    return Section("summary", "Summary: size, speed, accuracy", blocks)


def _warnings(m: dict) -> Section:
    blocks: list[Any] = []
    warnings = [str(w) for w in m.get("warnings") or []]
    constraints = [str(c) for c in m.get("constraints") or []]
    if warnings:
        blocks.append(Items(warnings, "warn"))
    else:
        blocks.append(Note("No warnings.", "muted"))
    if constraints:
        blocks.append(Note("Constraints callers of the compiled graph must respect:"))
        blocks.append(Items(constraints, "note"))
    else:
        blocks.append(Note("No constraints beyond the I/O signature.", "muted"))
    return Section("warnings", f"Warnings ({len(warnings)}) and constraints ({len(constraints)})", blocks)


def _passes(m: dict) -> Section:
    passes = [p for p in m.get("passes") or [] if isinstance(p, dict)]
    if not passes:
        return Section("passes", "Pass timeline", [Note("The manifest records no passes.", "muted")])
    has_verify = any(p.get("verify") for p in passes)
    rows: list[list[Cell | str]] = []
    total = sum(float(p.get("seconds") or 0) for p in passes)
    labels, values, texts = [], [], []
    for i, p in enumerate(passes, 1):
        name = str(p.get("name", "?")) + (f" (iteration {p['iteration']})" if p.get("iteration") is not None else "")
        secs = float(p.get("seconds") or 0)
        nb, na = p.get("nodes_before"), p.get("nodes_after")
        bb, ba = p.get("bytes_before"), p.get("bytes_after")
        dn = na - nb if na is not None and nb is not None else None
        db = ba - bb if ba is not None and bb is not None else None
        counters = ", ".join(f"{k}={v}" for k, v in (p.get("counters") or {}).items() if v) or (
            "modified" if p.get("modified") else "no change")
        opts = ", ".join(f"{k}={v}" for k, v in (p.get("options") or {}).items())
        row: list[Cell | str] = [
            _c(i, "num"), _c(name, "code nowrap" if p.get("modified") else "code nowrap muted", opts),
            _c(f"{secs:.3f}", "num"), _c(f"{secs / total:.0%}" if total else "-", "num muted"),
            _c(f"{fmt_num(nb)} → {fmt_num(na)}", "num"), _c_num(_signed_cell(dn)),
            _c(human_bytes(ba), "num"), _c_num(_signed_cell(db, fmt_bytes_delta(db))),
            _c(counters, "small" if p.get("modified") else "small muted"),
        ]
        if has_verify:
            v = p.get("verify") or {}
            f = v.get("figures") or {}
            row.append(_c(f"cos {fmt_num(f.get('cosine'), 6)}, max|Δ| {fmt_num(f.get('max_abs'), 3)}" if f else "-",
                          "small " + ("fail" if v.get("misses") else "")))
        rows.append(row)
        labels.append(f"{i}. {name}")
        values.append(secs)
        texts.append(f"{secs:.3f} s")
    first, last = passes[0], passes[-1]
    dn = (last.get("nodes_after") or 0) - (first.get("nodes_before") or 0)
    db = (last.get("bytes_after") or 0) - (first.get("bytes_before") or 0)
    foot: list[Cell | str] = [
        "", "total", _c(f"{total:.3f}", "num"), _c("100%" if total else "-", "num muted"),
        _c(f"{fmt_num(first.get('nodes_before'))} → {fmt_num(last.get('nodes_after'))}", "num"),
        _c_num(_signed_cell(dn)), _c(human_bytes(last.get("bytes_after")), "num"),
        _c_num(_signed_cell(db, fmt_bytes_delta(db))), "",
    ] + ([""] if has_verify else [])
    headers = ["#", "pass", "seconds", "share", "nodes", "Δ nodes", "weights", "Δ weights", "counters"]
    headers += ["verify-each"] if has_verify else []
    blocks: list[Any] = [
        Bars(labels, values, texts, unit="seconds", title="seconds per pass"),
        Table(headers, rows, "rlrrrrrrll", foot=foot),
        Note("Passes in pipeline order; 'weights' is initializer bytes after the pass. "
             "Hover a pass name for its options.", "muted"),
    ]
    return Section("passes", f"Pass timeline ({len(passes)} passes, {total:.2f} s)", blocks)


def _c_num(cell: Cell) -> Cell:
    cell.cls = (cell.cls + " num").strip()
    return cell


def _ops(m: dict) -> Section:
    a = m.get("artifact") or {}
    ops = a.get("ops") or {}
    src_ops = a.get("source_ops")
    if not ops and not src_ops:
        return Section("ops", "Op histogram", [Note("The manifest has no op histogram (compiled by an older llmopt).", "muted")])
    src_ops = src_ops or {}
    keys = sorted(set(ops) | set(src_ops), key=lambda k: (-max(ops.get(k, 0), src_ops.get(k, 0)), k))
    any_domain = any(split_op(k)[1] for k in keys)
    rows: list[list[Cell | str]] = []
    for k in keys:
        name, domain = split_op(k)
        s, t = src_ops.get(k, 0), ops.get(k, 0)
        d = t - s
        tag = " new" if s == 0 and a.get("source_ops") else " gone" if t == 0 else ""
        row: list[Cell | str] = [_c(name, "code")]
        if any_domain:
            row.append(_c(domain, "muted small"))
        row += [_c(s if a.get("source_ops") is not None else "-", "num"), _c(t, "num"),
                _c(fmt_signed(d) + tag, "num") if d else _c("0", "num muted")]
        rows.append(row)
    headers = ["op"] + (["domain"] if any_domain else []) + ["source", "artifact", "Δ"]
    foot: list[Cell | str] = ["total"] + ([""] if any_domain else []) + [
        _c(sum(src_ops.values()) if a.get("source_ops") is not None else "-", "num"), _c(sum(ops.values()), "num"), ""]
    changed = sum(1 for k in keys if ops.get(k, 0) != src_ops.get(k, 0))
    blocks = [Table(headers, rows, ("l" + ("l" if any_domain else "") + "rrr"), foot=foot),
              Note(f"{len(keys)} op types, {changed} with different counts; sorted by the larger of the two counts.", "muted")]
    return Section("ops", "Op histogram: source vs artifact", blocks)


def _latency(bench: dict | None) -> Section:
    title = "Latency per token vs position"
    if bench is None:
        return Section("latency", title, [Note(
            "No bench report given. Measure one with `llmopt bench ART --json > bench.json`, then render this "
            "report with `llmopt report ART --bench bench.json` to plot decode-step latency against position.", "muted")])
    s = bench.get("settings") or {}
    start = int(s.get("prompt_len") or 0)
    series = []
    rows: list[list[Cell | str]] = []
    for key, mod in (bench.get("models") or {}).items():
        for batch, b in (mod.get("batches") or {}).items():
            steps = [float(x) for x in (b.get("steps_ms_last_run") or [])]
            if steps:
                series.append((f"{key}, batch {batch}", list(range(start, start + len(steps))), steps))
            rows.append([
                _c(key), _c(batch, "num"), _c(f"{mod.get('loop', '?')}, {mod.get('kv_buffer', '?')}", "small"),
                _c(fmt_num(mod.get("load_s_median"), 3), "num"),
                _c(f"{b.get('prefill_tokens_per_s', 0):.0f}" if b.get("prefill_tokens_per_s") is not None else "-", "num"),
                _c(f"{b.get('decode_tokens_per_s', 0):.0f}" if b.get("decode_tokens_per_s") is not None else "-", "num"),
                _c(f"{fmt_num(b.get('step_ms_p50'))} / {fmt_num(b.get('step_ms_p90'))}", "num"),
                _c(human_bytes(b.get("kv_cache_bytes")), "num"),
                _c(f"{b['roofline_fraction']:.0%}" if b.get("roofline_fraction") is not None else "-", "num"),
                _c(sparkline(steps), "spark"),
            ])
    blocks: list[Any] = [Note(
        f"Prompt {s.get('prompt_len', '?')} tokens, {s.get('new_tokens', '?')} new tokens, batches "
        f"{', '.join(str(x) for x in s.get('batches') or []) or '?'}, {s.get('threads', '?')} threads, "
        f"{s.get('repeats', '?')} repeats; memory bandwidth {bench.get('memory_bandwidth_gbs', '?')} GB/s. "
        "Each line is the last run's decode steps; the first step is at the prompt length.", "muted")]
    if series:
        blocks.append(Lines(series, "position (tokens in the cache)", "ms per decode step", "decode step latency"))
    else:
        blocks.append(Note("The bench report has no per-step latencies (steps_ms_last_run).", "warn"))
    blocks.append(Table(["model", "batch", "loop, KV buffer", "load s", "prefill tok/s", "decode tok/s",
                         "step ms p50 / p90", "KV cache", "roofline", "steps"], rows, "lrlrrrrrrl"))
    for batch, r in (bench.get("ratios") or {}).items():
        blocks.append(Note(f"batch {batch}: artifact vs baseline decode {fmt_ratio(r.get('decode_speedup'))}, "
                           f"prefill {fmt_ratio(r.get('prefill_speedup'))} (medians of per-run ratios)"))
    if bench.get("peak_rss_bytes") is not None:
        blocks.append(Note(f"Peak RSS of the bench process: {human_bytes(bench['peak_rss_bytes'])}.", "muted"))
    return Section("latency", title, blocks)


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


def quant_layer(name: str, rec: dict) -> int | None:
    """A quantized weight's layer: the record's own ``layer``, else one in its ``scope``/``node`` name, else its name."""
    if isinstance(rec.get("layer"), int) and not isinstance(rec.get("layer"), bool):
        return rec["layer"]
    for key in ("scope", "module", "node"):
        if isinstance(rec.get(key), str) and layer_index(rec[key]) is not None:
            return layer_index(rec[key])
    return layer_index(name)


def _quant(m: dict) -> Section:
    title = "Per-layer quantization error"
    qe = m.get("quantization_error")
    if not qe:
        return Section("quantization", title, [Note(
            "The manifest has no quantization_error: no pass in this pipeline recorded per-weight quantization "
            "error (the pipeline does not quantize weights, or its passes do not record it).", "muted")])
    entries: list[tuple[str, float, dict]] = []
    for name, rec in (qe.items() if isinstance(qe, dict) else []):
        if isinstance(rec, dict) and isinstance(rec.get("rel_rmse"), (int, float)):
            entries.append((str(name), float(rec["rel_rmse"]), rec))
        elif isinstance(rec, (int, float)) and not isinstance(rec, bool):
            entries.append((str(name), float(rec), {}))
    if not entries:
        return Section("quantization", title, [Note("quantization_error holds no rel_rmse figures.", "warn")])
    bars, bars_note = _bars_by_layer([(n, quant_layer(n, r), v) for n, v, r in entries], lambda v: f"{v:.4g}",
                                     "relative RMSE", "relative RMSE")
    worst = sorted(entries, key=lambda e: (-e[1], e[0]))[:10]
    rows: list[list[Cell | str]] = []
    for name, v, rec in worst:
        li = quant_layer(name, rec)
        details = ", ".join(f"{k}={'-' if v2 is None else v2}" for k, v2 in rec.items() if k not in ("rel_rmse", "pass"))
        rows.append([_c(name, "code"), _c("-" if li is None else li, "num"), _c(rec.get("pass", "-"), "code"),
                     _c(fmt_num(v, 4), "num"), _c(details or "", "small")])
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


def _sparsity(m: dict) -> Section | None:
    sp = m.get("sparsity")
    if not sp:
        return None
    title = "Sparsity"
    if not isinstance(sp, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sp.values()):
        pairs = sp.items() if isinstance(sp, dict) else [("sparsity", sp)]
        rows = [[_c(k, "code"), _c(json.dumps(v), "small")] for k, v in pairs]
        return Section("sparsity", title, [Table(["key", "value"], rows, "ll")])
    items = sorted(((str(k), float(v)) for k, v in sp.items()),
                   key=lambda e: (layer_index(e[0]) is None, layer_index(e[0]) or 0, _natural_key(e[0])))
    bars, bars_note = _bars_by_layer([(n, layer_index(n), v * 100) for n, v in items], lambda v: f"{v:.1f}%",
                                     "% zeros", "share of zeros")
    vals = [v for _, v in items]
    limit = 40
    rows = [[_c(n, "code"), _c("-" if layer_index(n) is None else layer_index(n), "num"), _c(f"{v:.1%}", "num")]
            for n, v in items[:limit]]
    blocks: list[Any] = [
        Note(f"{len(items)} pruned weights: zeros mean {statistics.fmean(vals):.1%}, min {min(vals):.1%}, "
             f"max {max(vals):.1%}. {bars_note}"),
        bars,
        Table(["tensor", "layer", "zeros"], rows, "lrr"),
    ]
    if len(items) > limit:
        blocks.append(Note(f"… and {len(items) - limit} more tensors (see llmopt.json).", "muted"))
    return Section("sparsity", title, blocks)


def build_sections(manifest: dict, bench: dict | None = None, artifact_dir: str | None = None) -> list[Section]:
    """The report's sections, in order (both renderers walk this list)."""
    _check_manifest(manifest)
    if bench is not None:
        check_bench(bench)
    sections = [_header(manifest, artifact_dir), _summary(manifest), _warnings(manifest), _passes(manifest),
                _ops(manifest), _latency(bench), _quant(manifest)]
    sp = _sparsity(manifest)
    if sp is not None:
        sections.append(sp)
    if bench is not None and artifact_dir is not None:
        measured = ((bench.get("models") or {}).get("artifact") or {}).get("path")
        if measured and _same_path(measured, artifact_dir) is False:
            sections[5].blocks.insert(0, Note(f"This bench report measured {measured}, not {artifact_dir}.", "warn"))
    return sections


def _same_path(a: str, b: str) -> bool | None:
    try:
        pa, pb = Path(a).resolve(), Path(b).resolve()
    except OSError:
        return None
    return pa == pb or pa == pb / "model.onnx"


# --------------------------------------------------------------------------- HTML

_CSS = """
:root{--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
--fg:#1f2328;--muted:#656d76;--bg:#fff;--panel:#f6f8fa;--border:#d0d7de;--grid:#e6e9ed;--axis:#8c959f;
--good:#1a7f37;--bad:#cf222e;--warn:#9a6700;--warnbg:#fff8c5;--failbg:#ffebe9;--passbg:#dafbe1}
@media (prefers-color-scheme:dark){
:root{--fg:#e6edf3;--muted:#8d96a0;--bg:#0d1117;--panel:#161b22;--border:#30363d;
--grid:#21262d;--axis:#6e7681;--good:#3fb950;--bad:#f85149;--warn:#d29922;--warnbg:#2d2410;--failbg:#3b1219;--passbg:#12261e}
}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 28px 64px}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.25em;margin:36px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--border)}
nav{font-size:.9em;margin:6px 0 18px;color:var(--muted)}
nav a{color:inherit;margin-right:14px}
table{border-collapse:collapse;margin:10px 0;font-size:.92em}
th,td{padding:4px 10px;border-bottom:1px solid var(--border);vertical-align:baseline;text-align:left}
th{background:var(--panel);font-weight:600}
tbody tr:nth-child(even){background:color-mix(in srgb,var(--panel) 60%,transparent)}
tfoot td{font-weight:600;border-top:2px solid var(--border)}
caption{text-align:left;font-weight:600;padding:4px 0}
.num,td.r,th.r{text-align:right;white-space:nowrap;font-family:var(--mono);font-variant-numeric:tabular-nums}
.code{font-family:var(--mono);font-size:.95em;overflow-wrap:break-word}
.small{font-size:.85em}
.nowrap{white-space:nowrap}
.muted{color:var(--muted)}
.good{color:var(--good)}
.bad{color:var(--bad)}
.pass{color:var(--good);font-weight:600}
.fail{color:var(--bad);font-weight:600}
.spark{font-family:ui-monospace,monospace;letter-spacing:-1px;color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px;margin:8px 0 16px}
.card{border:1px solid var(--border);border-radius:8px;padding:10px 14px;background:var(--panel)}
.card .label{font-size:.8em;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.card .value{font-size:1.7em;font-weight:600;font-family:var(--mono)}
.card .sub{font-size:.85em;color:var(--muted)}
.card.pass{background:var(--passbg)}
.card.fail{background:var(--failbg)}
.card.pass,.card.fail{color:var(--fg);font-weight:400}
.card.pass .value{color:var(--good)}
.card.fail .value{color:var(--bad)}
.card.good .value{color:var(--good)}
.card.bad .value{color:var(--bad)}
.card.muted .value{color:var(--muted)}
p.note{margin:6px 0}
p.note.muted{color:var(--muted);font-size:.9em}
p.note.warn,li.warn{background:var(--warnbg);padding:4px 8px;border-radius:4px}
p.note.fail{background:var(--failbg);padding:4px 8px;border-radius:4px}
ul{padding-left:22px}
li{margin:3px 0}
code{font-family:var(--mono);background:var(--panel);padding:1px 4px;border-radius:4px}
.scroll{overflow-x:auto}
svg.chart{display:block;max-width:100%;height:auto;margin:8px 0;font:12px var(--mono)}
svg.chart text{fill:var(--fg)}
svg.chart .tick{fill:var(--muted)}
svg.chart .grid{stroke:var(--grid)}
svg.chart .axis{stroke:var(--axis)}
svg.chart .axis-label{fill:var(--muted)}
footer{margin-top:40px;color:var(--muted);font-size:.85em}
"""


def _inline_code(text: str) -> str:
    """HTML-escaped text with `backticked` spans as <code>."""
    parts = re.split(r"`([^`]+)`", text)
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(parts))


def _html_cell(cell: Cell | str, tag: str, align: str) -> str:
    if not isinstance(cell, Cell):
        cell = Cell(str(cell))
    cls = " ".join(x for x in (cell.cls, "r" if align == "r" else "") if x)
    attrs = (f' class="{esc(cls)}"' if cls else "") + (f' title="{esc(cell.tip)}"' if cell.tip else "")
    return f"<{tag}{attrs}>{esc(cell.text)}</{tag}>"


def _html_block(b: Any) -> str:
    if isinstance(b, Table):
        al = lambda i: b.align[i] if i < len(b.align) else "l"  # noqa: E731
        out = ['<div class="scroll"><table>']
        if b.caption:
            out.append(f"<caption>{esc(b.caption)}</caption>")
        if any(h for h in b.headers):
            out.append("<thead><tr>" + "".join(_html_cell(h, "th", al(i)) for i, h in enumerate(b.headers)) + "</tr></thead>")
        out.append("<tbody>")
        for row in b.rows:
            out.append("<tr>" + "".join(_html_cell(c, "td", al(i)) for i, c in enumerate(row)) + "</tr>")
        out.append("</tbody>")
        if b.foot:
            out.append("<tfoot><tr>" + "".join(_html_cell(c, "td", al(i)) for i, c in enumerate(b.foot)) + "</tr></tfoot>")
        out.append("</table></div>")
        return "".join(out)
    if isinstance(b, Bars):
        return svg_hbar_chart(b.labels, b.values, value_labels=b.texts, unit=b.unit, title=b.title)
    if isinstance(b, Lines):
        return svg_line_chart(b.series, xlabel=b.xlabel, ylabel=b.ylabel, title=b.title)
    if isinstance(b, Note):
        return f'<p class="note {esc(b.kind)}">{_inline_code(b.text)}</p>'
    if isinstance(b, Items):
        return "<ul>" + "".join(f'<li class="{esc(b.kind)}">{_inline_code(i)}</li>' for i in b.items) + "</ul>"
    if isinstance(b, Cards):
        return '<div class="cards">' + "".join(
            f'<div class="card {esc(c.cls)}"><div class="label">{esc(c.label)}</div><div class="value">{esc(c.value)}</div>'
            f'<div class="sub">{esc(c.sub)}</div></div>' for c in b.cards) + "</div>"
    raise TypeError(f"unknown report block {type(b).__name__}")


def _short_title(title: str) -> str:
    return title.split(":")[0].split(" (")[0]


def render_html(manifest: dict, bench: dict | None = None, title: str | None = None, *,
                artifact_dir: str | os.PathLike | None = None) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG; no scripts, nothing fetched)."""
    sections = build_sections(manifest, bench, str(artifact_dir) if artifact_dir is not None else None)
    title = title or default_title(manifest)
    version = manifest.get("llmopt_version", "?")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f'<meta name="generator" content="llmopt {esc(version)}">',
           f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
           f"<h1>{esc(title)}</h1>",
           "<nav>" + "".join(f'<a href="#{esc(s.id)}">{esc(_short_title(s.title))}</a>' for s in sections) + "</nav>"]
    for s in sections:
        out.append(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>')
        out.extend(_html_block(b) for b in s.blocks)
        out.append("</section>")
    out.append(f"<footer>Generated by llmopt from the artifact's llmopt.json (manifest of llmopt {esc(version)})"
               f"{' and a bench report' if bench is not None else ''}.</footer>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- Markdown


def _md_text(text: str) -> str:
    """Table-cell safe Markdown text: no newlines, pipes and angle brackets escaped."""
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<").replace(">", "\\>")


def _md_cell(cell: Cell | str) -> str:
    if not isinstance(cell, Cell):
        cell = Cell(str(cell))
    if not cell.text:
        return ""
    if "code" in cell.cls.split() and "`" not in cell.text:
        return "`" + " ".join(cell.text.split()).replace("|", "\\|") + "`"
    text = _md_text(cell.text)
    return f"**{text}**" if {"pass", "fail"} & set(cell.cls.split()) else text


def _md_block(b: Any) -> str:
    if isinstance(b, Table):
        n = len(b.headers)
        out = []
        if b.caption:
            out.append(f"**{_md_text(b.caption)}**\n")
        headers = [_md_text(h) for h in b.headers]
        if not any(headers):
            headers = ["", ""][:n] if n == 2 else headers
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "|".join("---:" if i < len(b.align) and b.align[i] == "r" else "---" for i in range(n)) + "|")
        for row in b.rows + ([b.foot] if b.foot else []):
            out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
        return "\n".join(out)
    if isinstance(b, Bars):
        return "```text\n" + ascii_bars(b.labels, b.values, b.texts) + "\n```"
    if isinstance(b, Lines):
        out = [f"{_md_text(b.ylabel)} against {_md_text(b.xlabel)}:", "",
               "| series | positions | steps | min | median | max |", "|---|---:|---|---:|---:|---:|"]
        for name, xs, ys in b.series:
            out.append(f"| {_md_text(name)} | {fmt_num(xs[0])}–{fmt_num(xs[-1])} | {sparkline(ys)} | "
                       f"{fmt_num(min(ys))} | {fmt_num(statistics.median(ys))} | {fmt_num(max(ys))} |")
        return "\n".join(out)
    if isinstance(b, Note):
        prefix = {"warn": "> **Warning:** ", "fail": "> **Fail:** "}.get(b.kind, "")
        return prefix + (f"_{b.text}_" if b.kind == "muted" and "`" not in b.text and "_" not in b.text else b.text)
    if isinstance(b, Items):
        return "\n".join(f"- {i}" for i in b.items)
    if isinstance(b, Cards):
        return "\n".join(f"- **{c.label}: {c.value}**" + (f" ({c.sub})" if c.sub else "") for c in b.cards)
    raise TypeError(f"unknown report block {type(b).__name__}")


def render_markdown(manifest: dict, bench: dict | None = None, title: str | None = None, *,
                    artifact_dir: str | os.PathLike | None = None) -> str:
    """The same report as Markdown (GitHub tables; plots as text bars and sparklines)."""
    sections = build_sections(manifest, bench, str(artifact_dir) if artifact_dir is not None else None)
    out = [f"# {title or default_title(manifest)}"]
    for s in sections:
        out.append(f"## {s.title}")
        out.extend(_md_block(b) for b in s.blocks)
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------- files


def load_bench(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such bench report; write one with `llmopt bench ART --json > {p}`")
    return check_bench(load_json(p, f"write it with `llmopt bench ART --json > {p}`"), str(p))


def _open_manifest(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    """An artifact's llmopt.json, or a report file itself (e.g. the --report of a failed compile)."""
    from llmopt.compiler.driver import Artifact

    if Path(artifact_dir).is_file() and str(artifact_dir).endswith(".json"):
        return _check_manifest(load_json(artifact_dir), str(artifact_dir))
    return _check_manifest(Artifact.open(artifact_dir).report, f"{artifact_dir}/llmopt.json")


def write_report(artifact_dir: str | os.PathLike, html: Path | None = None, markdown: Path | None = None,
                 bench_json: Path | None = None, title: str | None = None) -> list[Path]:
    """Render the report of the artifact at ``artifact_dir`` (with the bench report ``bench_json``, if any)
    to ``html`` and/or ``markdown``; returns the paths written."""
    if html is None and markdown is None:
        raise InputError("give --html FILE and/or --markdown FILE: where to write the report")
    if html is not None and markdown is not None and Path(html).resolve() == Path(markdown).resolve():
        raise InputError(f"{html}: --html and --markdown name the same file; give two paths")
    src = Path(artifact_dir)
    inputs = preflight.directory_inputs("artifact file", src) if src.is_dir() else [("report", src)]
    inputs += [("bench report", Path(bench_json))] if bench_json is not None else []
    preflight.check(inputs, [preflight.Output(flag, Path(p)) for flag, p in (("--html", html), ("--markdown", markdown))
                             if p is not None])
    manifest = _open_manifest(artifact_dir)
    bench = load_bench(bench_json) if bench_json is not None else None
    written = []
    for path, render in ((html, render_html), (markdown, render_markdown)):
        if path is not None:
            write_atomic(Path(path), render(manifest, bench, title, artifact_dir=str(artifact_dir)))
            written.append(Path(path))
    return written

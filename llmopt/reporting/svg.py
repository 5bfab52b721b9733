"""The report's charts as inline SVG: a horizontal bar chart and a line chart, with round ticks.

Presentation attributes are written on the elements, so a chart copied out of the page still looks
right; the page's CSS (html.py) overrides them, e.g. for a dark colour scheme.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

from llmopt.reporting.format import ellipsize, fmt_num

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#bab0ac")


def esc(text: Any) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


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
    shown = [ellipsize(str(lab), 34) for lab in labels]
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

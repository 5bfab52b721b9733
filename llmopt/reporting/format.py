"""How llmopt writes numbers for people: bytes, counts, fixed and significant digits, signed changes,
ratios, percentages, and text sparklines / bars.

Every printer (the compile summary, `compare`, `bench`, `eval`, `inspect`) and both report renderers
format through here, so one figure reads the same wherever it appears. Each function takes None
(a figure that was not measured) and returns "-" for it, unless it says otherwise.
"""

from __future__ import annotations

import math
from typing import Sequence

MISSING = "-"
_MIB = 2**20


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (binary units; whole bytes below 1 KiB)."""
    if n is None:
        return MISSING
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: int) -> str:
    """1_234_567 -> '1.23M' (decimal K, M, B)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def fmt_mib(n: float | None, decimals: int = 1) -> str:
    """Bytes in MiB at a fixed precision (for columns that compare like with like): '12.5 MiB'."""
    return MISSING if n is None else fmt_fixed(n / _MIB, decimals, " MiB")


def fmt_bytes_delta(d: int | None) -> str:
    """A change in bytes: '+1.5 KiB', '-20 B', '0'."""
    if d is None:
        return MISSING
    if d == 0:
        return "0"
    return ("+" if d > 0 else "-") + human_bytes(abs(d))


def fmt_num(v: float | int | None, digits: int = 4) -> str:
    """A number for a table: ints as is, floats to ``digits`` significant figures, bools as true/false."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}"


def fmt_fixed(v: float | None, decimals: int = 2, suffix: str = "") -> str:
    """``v`` with ``decimals`` digits after the point, then ``suffix``: fmt_fixed(1.5, 3, ' s') -> '1.500 s'."""
    return MISSING if v is None else f"{v:.{decimals}f}{suffix}"


def fmt_signed(v: float | int | None, digits: int = 3, zero: str | None = None) -> str:
    """A change with its sign: ints exactly ('+3'), floats to ``digits`` significant figures;
    ``zero``: what to write for no change (default '+0')."""
    if v is None:
        return MISSING
    if zero is not None and v == 0:
        return zero
    if isinstance(v, int):
        return f"{v:+d}"
    return f"{v:+.{digits}g}"


def fmt_ratio(v: float | None, digits: int = 3) -> str:
    """A ratio to 3 significant figures: '0.271x', '12.3x'."""
    return MISSING if v is None else f"{v:.{digits}g}x"


def fmt_pct(v: float | None, signed: bool = True, decimals: int = 2) -> str:
    """A fraction as a percentage: 0.0123 -> '+1.23%' (``signed``) or '1.23%'."""
    if v is None:
        return MISSING
    return f"{v:+.{decimals}%}" if signed else f"{v:.{decimals}%}"


def fmt_pp(d: float | None) -> str:
    """A difference of two fractions in percentage points: 0.0123 -> '+1.23 pp'."""
    return MISSING if d is None else f"{d * 100:+.2f} pp"


def fmt_hash(h: object) -> str:
    """A sha256 (or any digest) by its first 12 hex digits, as git shortens commits."""
    return MISSING if h is None else str(h)[:12]


def ellipsize(text: str, limit: int, keep_end: bool = False) -> str:
    """``text`` cut to ``limit`` characters with '…' where it was cut: its start kept, or its end
    (``keep_end``: paths and pipelines, which differ at the end)."""
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1):] if keep_end else text[: limit - 1] + "…"


def round_significant(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant figures (a tiny model's 0.02 ms keeps its digits)."""
    return float(f"{x:.{digits}g}")


# --------------------------------------------------------------------------- text charts

_SPARK = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def sparkline(values: Sequence[float]) -> str:
    """A series as one line of block characters, low to high ('▁▃█▅')."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    return "".join(_SPARK[0 if hi == lo else min(7, int((v - lo) / (hi - lo) * 8))] for v in vals)


def ascii_bars(labels: Sequence[str], values: Sequence[float], texts: Sequence[str], width: int = 40) -> str:
    """A horizontal bar chart in text: one 'label  ████▍  text' line per value (eighths of a cell)."""
    vals = [max(0.0, v) if v is not None and math.isfinite(v) else 0.0 for v in values]
    top = max(vals, default=0.0) or 1.0
    lw = max((len(str(lab)) for lab in labels), default=0)
    lines = []
    for lab, v, t in zip(labels, vals, texts):
        eighths = round(v / top * width * 8)
        bar = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
        lines.append(f"{str(lab).ljust(lw)}  {bar.ljust(width)}  {t}")
    return "\n".join(lines)

"""Formatting helpers for what the CLI prints, and reading / writing its JSON and report files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmopt.errors import InputError


def load_json(path: str | os.PathLike, hint: str = "") -> Any:
    """``path`` parsed as JSON, or a one-line InputError saying where it is not (``hint``: what to do)."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InputError(f"{p}: not JSON{where}{'; ' + hint if hint else ''}") from None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)

"""What machine a figure was measured on: CPU model and last-level cache (named in every table)."""

from __future__ import annotations

import platform
from pathlib import Path

_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def last_level_cache_bytes() -> int | None:
    """Size of the highest cache level (L3 on these machines), from sysfs; None where unknown."""
    best: tuple[int, int] | None = None
    for index in sorted(_CACHE.glob("index*")):
        try:
            level = int((index / "level").read_text())
            if (index / "type").is_file() and (index / "type").read_text().strip() == "Instruction":
                continue
            size = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)

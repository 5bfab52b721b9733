"""What the reports read: an artifact's manifest (llmopt.json) and a bench report (`llmopt bench --json`),
checked once at the door, and the few accessors every reader needs."""

from __future__ import annotations

from typing import Any, Iterator

from llmopt.errors import InputError


def check_manifest(manifest: Any, where: str = "manifest", need: tuple[str, ...] = ("artifact", "target")) -> dict[str, Any]:
    """``manifest`` if it is an llmopt manifest holding the ``need`` keys (an 'artifact' section among them),
    else a one-line InputError naming ``where``."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifact"), dict) or any(k not in manifest for k in need):
        missing = " and ".join(f"'{k}'" for k in need) + (" section" if len(need) == 1 else "")
        raise InputError(f"{where}: not an llmopt manifest (no {missing}); compile a model first")
    return manifest


def check_bench(bench: Any, where: str = "bench report") -> dict[str, Any]:
    if not isinstance(bench, dict) or not isinstance(bench.get("models"), dict) or not isinstance(bench.get("settings"), dict):
        raise InputError(f"{where}: not an llmopt bench report (no 'settings' and 'models'); "
                         f"write one with `llmopt bench ART --json > bench.json`")
    return bench


def is_number(v: Any) -> bool:
    """An int or float from JSON (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, or None where a level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def target_name(m: dict, missing: Any = None) -> Any:
    """The target's name (manifests record the target as a dict, older ones as its name)."""
    t = m.get("target")
    return t.get("name", missing) if isinstance(t, dict) else t


def bench_batches(bench: dict) -> Iterator[tuple[str, dict, str, dict]]:
    """(model key, model record, batch, batch record) for every measured model and batch, in report order."""
    for key, mod in (bench.get("models") or {}).items():
        for batch, b in (mod.get("batches") or {}).items():
            yield key, mod, batch, b

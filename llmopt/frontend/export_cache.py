"""A cache of exports, so that compiling one Hugging Face directory for several targets exports it once.

``torch.onnx`` takes seconds on a tiny model and minutes on a large one; ``llmopt compile HF_DIR
--target …`` run per target used to pay it every time. An export is stored under a key that covers
everything it depends on — every file of the model directory (names, sizes and contents), the
export options, and the versions of llmopt's exporter, torch, transformers, onnxscript and onnx_ir —
so a changed weight, config or library is a miss, never a stale hit.

Where: ``$LLMOPT_CACHE_DIR/exports`` (default ``$XDG_CACHE_HOME/llmopt`` or ``~/.cache/llmopt``).
``LLMOPT_EXPORT_CACHE=0`` turns it off. Models whose weight files exceed ``LLMOPT_EXPORT_CACHE_MAX_GB``
(default 2) are not stored: a second copy of a large model on disk costs more than its export.
Entries are written to a staging directory and renamed into place, so a killed writer leaves no
half entry; nothing is ever read from an entry without its ``complete`` marker.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_MARKER = "complete"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def enabled() -> bool:
    return os.environ.get("LLMOPT_EXPORT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def root() -> Path:
    base = os.environ.get("LLMOPT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmopt"
    return Path(base) / "exports"


def _versions() -> list[str]:
    from importlib import metadata

    found = []
    for name in ("llmopt", "torch", "transformers", "onnxscript", "onnx-ir", "onnx"):
        try:
            found.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}=none")
    # a development checkout changes the exporter without changing llmopt's version
    found.append(hashlib.sha256(Path(__file__).with_name("exporter.py").read_bytes()).hexdigest())
    return found


def _files(model_dir: Path) -> list[Path]:
    """The directory's files, hidden ones (a clone's .git, editor files) left out."""
    return sorted(p for p in model_dir.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts))


def key(model_dir: Path, **options) -> str:
    """The cache key of exporting ``model_dir`` with ``options`` (streams every file: memory stays flat)."""
    h = hashlib.sha256()
    for item in [*_versions(), *(f"{k}={options[k]}" for k in sorted(options))]:
        h.update(item.encode() + b"\0")
    for path in _files(model_dir):
        h.update(str(path.relative_to(model_dir)).encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in _files(model_dir) if p.suffix in _WEIGHT_SUFFIXES)


def worth_storing(model_dir: Path) -> bool:
    cap = float(os.environ.get("LLMOPT_EXPORT_CACHE_MAX_GB", "2")) * (1 << 30)
    return enabled() and weight_bytes(model_dir) <= cap


def lookup(k: str) -> Path | None:
    """The cached .onnx for key ``k`` (its weights beside it), or None."""
    entry = root() / k
    model = entry / "model.onnx"
    return model if enabled() and (entry / _MARKER).is_file() and model.is_file() else None


def store(k: str, save) -> None:
    """Store an entry: ``save(path)`` writes the model to ``path`` (an .onnx in a staging folder).
    Best effort: a cache that cannot be written (read-only home, full disk) never fails an export."""
    entry = root() / k
    if entry.exists():
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{k[:16]}-", dir=entry.parent))
    except OSError:
        return
    try:
        save(staging / "model.onnx")
        (staging / _MARKER).write_text("")
        os.rename(staging, entry)
    except OSError:
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)

"""Reading the JSON files reports are made from: manifests (llmopt.json, or a failed compile's --report)
and bench reports, each checked on the way in, with one-line errors that say what to do."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmopt.errors import InputError
from llmopt.reporting.manifest import check_bench, check_manifest


def load_json(path: str | os.PathLike, hint: str = "") -> Any:
    """``path`` parsed as JSON, or a one-line InputError saying where it is not (``hint``: what to do)."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InputError(f"{p}: not JSON{where}{'; ' + hint if hint else ''}") from None


def load_bench(path: str | os.PathLike) -> dict[str, Any]:
    """A bench report (`llmopt bench ART --json` output)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such bench report; write one with `llmopt bench ART --json > {p}`")
    return check_bench(load_json(p, f"write it with `llmopt bench ART --json > {p}`"), str(p))


def load_manifest(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    """An artifact's llmopt.json, or a report file itself (e.g. the --report of a failed compile)."""
    from llmopt.compiler.driver import Artifact

    if Path(artifact_dir).is_file() and str(artifact_dir).endswith(".json"):
        return check_manifest(load_json(artifact_dir), str(artifact_dir))
    return check_manifest(Artifact.open(artifact_dir).report, f"{artifact_dir}/llmopt.json")

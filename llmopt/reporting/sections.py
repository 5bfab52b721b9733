"""The report as a list of sections: an artifact's manifest (and optionally a bench report) in, document
blocks out (document.py). Pure: no markup, no files; both renderers walk the same list, so the HTML and
the Markdown report always say the same things.

The builders live by subject: sections_compile (overview, summary, warnings, passes, ops),
sections_bench (latency), sections_weights (quantization error, sparsity).
"""

from __future__ import annotations

import os
from pathlib import Path

from llmopt.reporting import sections_bench, sections_compile, sections_weights
from llmopt.reporting.document import Report, Section
from llmopt.reporting.manifest import check_bench, check_manifest, target_name


def default_title(manifest: dict) -> str:
    src = (manifest.get("source") or {}).get("path") or "model"
    return f"llmopt report: {Path(str(src)).name} → {target_name(manifest, '?')}"


def build_sections(manifest: dict, bench: dict | None = None, artifact_dir: str | None = None) -> list[Section]:
    """The report's sections, in order (``artifact_dir``: where the manifest came from, for the overview
    and to check that the bench report measured it)."""
    check_manifest(manifest)
    if bench is not None:
        check_bench(bench)
    sections = [
        sections_compile.overview(manifest, artifact_dir),
        sections_compile.summary(manifest),
        sections_compile.warnings(manifest),
        sections_compile.passes(manifest),
        sections_compile.ops(manifest),
        sections_bench.latency(bench, artifact_dir),
        sections_weights.quantization(manifest),
    ]
    sparsity = sections_weights.sparsity(manifest)
    return sections + ([sparsity] if sparsity is not None else [])


def build_report(manifest: dict, bench: dict | None = None, title: str | None = None,
                 artifact_dir: str | os.PathLike | None = None) -> Report:
    """The whole report: its title (default: source → target) and sections."""
    sections = build_sections(manifest, bench, str(artifact_dir) if artifact_dir is not None else None)
    return Report(title or default_title(manifest), sections, str(manifest.get("llmopt_version", "?")), bench is not None)

"""`llmopt report`: an artifact's manifest (and optionally a bench report) as one HTML page or Markdown.

The entry points compose the package: files (read and check the inputs) -> sections (the document) ->
html / markdown (the renderers). Both formats render the same sections, so they say the same things.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmopt.compiler import preflight
from llmopt.core.atomic import write_atomic
from llmopt.errors import InputError
from llmopt.reporting import html as _html
from llmopt.reporting import markdown as _markdown
from llmopt.reporting.files import load_bench, load_manifest
from llmopt.reporting.sections import build_report


def render_html(manifest: dict, bench: dict | None = None, title: str | None = None, *,
                artifact_dir: str | os.PathLike | None = None) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG; no scripts, nothing fetched)."""
    return _html.render(build_report(manifest, bench, title, artifact_dir))


def render_markdown(manifest: dict, bench: dict | None = None, title: str | None = None, *,
                    artifact_dir: str | os.PathLike | None = None) -> str:
    """The same report as Markdown (GitHub tables; plots as text bars and sparklines)."""
    return _markdown.render(build_report(manifest, bench, title, artifact_dir))


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
    manifest = load_manifest(artifact_dir)
    bench = load_bench(bench_json) if bench_json is not None else None
    written = []
    for path, render in ((html, render_html), (markdown, render_markdown)):
        if path is not None:
            write_atomic(Path(path), render(manifest, bench, title, artifact_dir=str(artifact_dir)))
            written.append(Path(path))
    return written

"""The report as Markdown: GitHub tables, charts as text bars and sparklines (for a PR comment or a CI summary)."""

from __future__ import annotations

import statistics

from llmopt.reporting.document import Bars, Cards, Cell, Items, Lines, Note, Report, Table, as_cell, block_renderer
from llmopt.reporting.format import ascii_bars, fmt_num, sparkline


def _md_text(text: str) -> str:
    """Table-cell safe Markdown text: no newlines, pipes and angle brackets escaped."""
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<").replace(">", "\\>")


def _md_cell(c: Cell | str) -> str:
    cell = as_cell(c)
    if not cell.text:
        return ""
    if "code" in cell.cls.split() and "`" not in cell.text:
        return "`" + " ".join(cell.text.split()).replace("|", "\\|") + "`"
    text = _md_text(cell.text)
    return f"**{text}**" if {"pass", "fail"} & set(cell.cls.split()) else text


def _table(b: Table) -> str:
    n = len(b.headers)
    out = []
    if b.caption:
        out.append(f"**{_md_text(b.caption)}**\n")
    headers = [_md_text(h) for h in b.headers]
    if not any(headers):
        headers = ["", ""][:n] if n == 2 else headers
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join("---:" if b.column_align(i) == "r" else "---" for i in range(n)) + "|")
    for row in b.rows + ([b.foot] if b.foot else []):
        out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(out)


def _lines(b: Lines) -> str:
    out = [f"{_md_text(b.ylabel)} against {_md_text(b.xlabel)}:", "",
           "| series | positions | steps | min | median | max |", "|---|---:|---|---:|---:|---:|"]
    for name, xs, ys in b.series:
        out.append(f"| {_md_text(name)} | {fmt_num(xs[0])}–{fmt_num(xs[-1])} | {sparkline(ys)} | "
                   f"{fmt_num(min(ys))} | {fmt_num(statistics.median(ys))} | {fmt_num(max(ys))} |")
    return "\n".join(out)


def _note(b: Note) -> str:
    prefix = {"warn": "> **Warning:** ", "fail": "> **Fail:** "}.get(b.kind, "")
    return prefix + (f"_{b.text}_" if b.kind == "muted" and "`" not in b.text and "_" not in b.text else b.text)


_md_block = block_renderer({
    Table: _table,
    Bars: lambda b: "```text\n" + ascii_bars(b.labels, b.values, b.texts) + "\n```",
    Lines: _lines,
    Note: _note,
    Items: lambda b: "\n".join(f"- {i}" for i in b.items),
    Cards: lambda b: "\n".join(f"- **{c.label}: {c.value}**" + (f" ({c.sub})" if c.sub else "") for c in b.cards),
})


def render(report: Report) -> str:
    """``report`` as Markdown."""
    out = [f"# {report.title}"]
    for s in report.sections:
        out.append(f"## {s.title}")
        out.extend(_md_block(b) for b in s.blocks)
    return "\n\n".join(out) + "\n"

"""The report as one self-contained HTML page: inline CSS, charts as inline SVG (svg.py), no scripts and
nothing fetched from the network, so it can be attached to a PR or a CI run as is."""

from __future__ import annotations

import re
from llmopt.reporting.document import Bars, Cards, Cell, Items, Lines, Note, Report, Table, as_cell, block_renderer
from llmopt.reporting.svg import esc, svg_hbar_chart, svg_line_chart

_CSS = """
:root{--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
--fg:#1f2328;--muted:#656d76;--bg:#fff;--panel:#f6f8fa;--border:#d0d7de;--grid:#e6e9ed;--axis:#8c959f;
--good:#1a7f37;--bad:#cf222e;--warn:#9a6700;--warnbg:#fff8c5;--failbg:#ffebe9;--passbg:#dafbe1}
@media (prefers-color-scheme:dark){
:root{--fg:#e6edf3;--muted:#8d96a0;--bg:#0d1117;--panel:#161b22;--border:#30363d;
--grid:#21262d;--axis:#6e7681;--good:#3fb950;--bad:#f85149;--warn:#d29922;--warnbg:#2d2410;--failbg:#3b1219;--passbg:#12261e}
}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 28px 64px}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.25em;margin:36px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--border)}
nav{font-size:.9em;margin:6px 0 18px;color:var(--muted)}
nav a{color:inherit;margin-right:14px}
table{border-collapse:collapse;margin:10px 0;font-size:.92em}
th,td{padding:4px 10px;border-bottom:1px solid var(--border);vertical-align:baseline;text-align:left}
th{background:var(--panel);font-weight:600}
tbody tr:nth-child(even){background:color-mix(in srgb,var(--panel) 60%,transparent)}
tfoot td{font-weight:600;border-top:2px solid var(--border)}
caption{text-align:left;font-weight:600;padding:4px 0}
.num,td.r,th.r{text-align:right;white-space:nowrap;font-family:var(--mono);font-variant-numeric:tabular-nums}
.code{font-family:var(--mono);font-size:.95em;overflow-wrap:break-word}
.small{font-size:.85em}
.nowrap{white-space:nowrap}
.muted{color:var(--muted)}
.good{color:var(--good)}
.bad{color:var(--bad)}
.pass{color:var(--good);font-weight:600}
.fail{color:var(--bad);font-weight:600}
.spark{font-family:ui-monospace,monospace;letter-spacing:-1px;color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px;margin:8px 0 16px}
.card{border:1px solid var(--border);border-radius:8px;padding:10px 14px;background:var(--panel)}
.card .label{font-size:.8em;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.card .value{font-size:1.7em;font-weight:600;font-family:var(--mono)}
.card .sub{font-size:.85em;color:var(--muted)}
.card.pass{background:var(--passbg)}
.card.fail{background:var(--failbg)}
.card.pass,.card.fail{color:var(--fg);font-weight:400}
.card.pass .value{color:var(--good)}
.card.fail .value{color:var(--bad)}
.card.good .value{color:var(--good)}
.card.bad .value{color:var(--bad)}
.card.muted .value{color:var(--muted)}
p.note{margin:6px 0}
p.note.muted{color:var(--muted);font-size:.9em}
p.note.warn,li.warn{background:var(--warnbg);padding:4px 8px;border-radius:4px}
p.note.fail{background:var(--failbg);padding:4px 8px;border-radius:4px}
ul{padding-left:22px}
li{margin:3px 0}
code{font-family:var(--mono);background:var(--panel);padding:1px 4px;border-radius:4px}
.scroll{overflow-x:auto}
svg.chart{display:block;max-width:100%;height:auto;margin:8px 0;font:12px var(--mono)}
svg.chart text{fill:var(--fg)}
svg.chart .tick{fill:var(--muted)}
svg.chart .grid{stroke:var(--grid)}
svg.chart .axis{stroke:var(--axis)}
svg.chart .axis-label{fill:var(--muted)}
footer{margin-top:40px;color:var(--muted);font-size:.85em}
"""


def _inline_code(text: str) -> str:
    """HTML-escaped text with `backticked` spans as <code>."""
    parts = re.split(r"`([^`]+)`", text)
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(parts))


def _html_cell(c: Cell | str, tag: str, align: str) -> str:
    cell = as_cell(c)
    cls = " ".join(x for x in (cell.cls, "r" if align == "r" else "") if x)
    attrs = (f' class="{esc(cls)}"' if cls else "") + (f' title="{esc(cell.tip)}"' if cell.tip else "")
    return f"<{tag}{attrs}>{esc(cell.text)}</{tag}>"


def _table(b: Table) -> str:
    out = ['<div class="scroll"><table>']
    if b.caption:
        out.append(f"<caption>{esc(b.caption)}</caption>")
    if any(h for h in b.headers):
        out.append(_row(b, b.headers, "thead", "th"))
    out.append("<tbody>")
    out.extend(_row(b, row, "", "td") for row in b.rows)
    out.append("</tbody>")
    if b.foot:
        out.append(_row(b, b.foot, "tfoot", "td"))
    out.append("</table></div>")
    return "".join(out)


def _row(b: Table, cells: list[Cell | str], group: str, tag: str) -> str:
    tr = "<tr>" + "".join(_html_cell(c, tag, b.column_align(i)) for i, c in enumerate(cells)) + "</tr>"
    return f"<{group}>{tr}</{group}>" if group else tr


def _cards(b: Cards) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card {esc(c.cls)}"><div class="label">{esc(c.label)}</div><div class="value">{esc(c.value)}</div>'
        f'<div class="sub">{esc(c.sub)}</div></div>' for c in b.cards) + "</div>"


_html_block = block_renderer({
    Table: _table,
    Bars: lambda b: svg_hbar_chart(b.labels, b.values, value_labels=b.texts, unit=b.unit, title=b.title),
    Lines: lambda b: svg_line_chart(b.series, xlabel=b.xlabel, ylabel=b.ylabel, title=b.title),
    Note: lambda b: f'<p class="note {esc(b.kind)}">{_inline_code(b.text)}</p>',
    Items: lambda b: "<ul>" + "".join(f'<li class="{esc(b.kind)}">{_inline_code(i)}</li>' for i in b.items) + "</ul>",
    Cards: _cards,
})


def _short_title(title: str) -> str:
    return title.split(":")[0].split(" (")[0]


def render(report: Report) -> str:
    """``report`` as an HTML page."""
    title, sections = report.title, report.sections
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f'<meta name="generator" content="llmopt {esc(report.version)}">',
           f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
           f"<h1>{esc(title)}</h1>",
           "<nav>" + "".join(f'<a href="#{esc(s.id)}">{esc(_short_title(s.title))}</a>' for s in sections) + "</nav>"]
    for s in sections:
        out.append(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>')
        out.extend(_html_block(b) for b in s.blocks)
        out.append("</section>")
    out.append(f"<footer>Generated by llmopt from the artifact's llmopt.json (manifest of llmopt {esc(report.version)})"
               f"{' and a bench report' if report.with_bench else ''}.</footer>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"

"""The report's document model: what the section builders produce and the renderers walk.

A ``Report`` is a title and a list of ``Section``s; a section holds blocks (``Table``, ``Bars``,
``Lines``, ``Note``, ``Items``, ``Cards``). Blocks carry text already formatted and a few style words
(``Cell.cls``: pass, fail, good, bad, muted, code, num ...), never markup, so HTML and Markdown say
the same things.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from llmopt.reporting.format import fmt_signed


@dataclasses.dataclass
class Cell:
    text: str
    cls: str = ""  # css class: pass, fail, up, down, muted, code
    tip: str = ""  # hover text (HTML only)


@dataclasses.dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell | str]]
    align: str = ""  # one letter per column, 'l' or 'r'; missing: 'l'
    caption: str = ""
    foot: list[Cell | str] | None = None  # a totals row

    def column_align(self, i: int) -> str:
        return self.align[i] if i < len(self.align) else "l"


@dataclasses.dataclass
class Bars:
    labels: list[str]
    values: list[float]
    texts: list[str]
    unit: str = ""
    title: str = ""


@dataclasses.dataclass
class Lines:
    series: list[tuple[str, list[float], list[float]]]
    xlabel: str
    ylabel: str
    title: str = ""


@dataclasses.dataclass
class Note:
    text: str
    kind: str = "note"  # note, warn, fail, muted


@dataclasses.dataclass
class Items:
    items: list[str]
    kind: str = ""


@dataclasses.dataclass
class Card:
    label: str
    value: str
    sub: str = ""
    cls: str = ""


@dataclasses.dataclass
class Cards:
    cards: list[Card]


@dataclasses.dataclass
class Section:
    id: str
    title: str
    blocks: list[Any]


@dataclasses.dataclass
class Report:
    title: str
    sections: list[Section]
    version: str = "?"  # the llmopt that wrote the manifest
    with_bench: bool = False  # drawn from a bench report too


def cell(text: Any, cls: str = "", tip: str = "") -> Cell:
    return Cell(str(text), cls, tip)


def as_cell(c: Cell | str) -> Cell:
    """Table rows may hold plain strings: a Cell either way."""
    return c if isinstance(c, Cell) else Cell(str(c))


def num_cell(c: Cell) -> Cell:
    """``c`` right-aligned as a number."""
    c.cls = (c.cls + " num").strip()
    return c


def signed_cell(d: float | int | None, text: str | None = None, good_when_negative: bool = True) -> Cell:
    """A change, coloured good or bad by its sign (``good_when_negative``: smaller is better); 0 muted."""
    if d is None or d == 0:
        return cell(text if text is not None else ("0" if d == 0 else "-"), "muted" if d == 0 else "")
    better = (d < 0) == good_when_negative
    return cell(text if text is not None else fmt_signed(d), "good" if better else "bad")


def block_renderer(handlers: dict[type, Callable[[Any], str]]) -> Callable[[Any], str]:
    """One function that renders any block with the handler for its type (a renderer's table of them)."""
    def render(block: Any) -> str:
        handler = handlers.get(type(block))
        if handler is None:
            raise TypeError(f"unknown report block {type(block).__name__}")
        return handler(block)

    return render

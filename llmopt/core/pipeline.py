"""Pipelines as strings a person can type, and the same as a TOML recipe.

Grammar (MLIR-style)::

    pipeline := item ("," item)*
    item     := "fixpoint" ["{" opts "}"] "(" pipeline ")"  |  NAME ["{" opts "}"]
    opts     := KEY "=" VALUE ("," KEY "=" VALUE)*

e.g. ``fold,cleanup,quantize-dynamic{per_channel=true}`` or
``fixpoint{max_iterations=4}(fold,cleanup)``. A recipe holds the same thing::

    [[passes]]
    name = "fold"

    [[passes]]
    name = "quantize-dynamic"
    options = { per_channel = true }

    [[passes]]
    fixpoint = [{ name = "fold" }, { name = "cleanup" }]
    max_iterations = 4
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any, Union

from llmopt.errors import InputError, PipelineError

DEFAULT_MAX_ITERATIONS = 8


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_fmt(v)}" for k, v in self.options) + "}"


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Run ``items`` repeatedly until no pass reports a change (or max_iterations)."""

    items: tuple["Item", ...]
    max_iterations: int = DEFAULT_MAX_ITERATIONS

    def __str__(self) -> str:
        opts = "" if self.max_iterations == DEFAULT_MAX_ITERATIONS else f"{{max_iterations={self.max_iterations}}}"
        return f"fixpoint{opts}(" + ",".join(map(str, self.items)) + ")"


Item = Union[PassSpec, FixedPoint]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    items: tuple[Item, ...]

    def __str__(self) -> str:
        return ",".join(map(str, self.items))

    def pass_specs(self) -> list[PassSpec]:
        out: list[PassSpec] = []

        def walk(items):
            for it in items:
                if isinstance(it, FixedPoint):
                    walk(it.items)
                else:
                    out.append(it)

        walk(self.items)
        return out

    def validate(self) -> None:
        """Check that every pass exists and every option parses (before touching a model)."""
        from llmopt.core.pass_base import make_options
        from llmopt.core.registry import get_pass

        for spec in self.pass_specs():
            cls = get_pass(spec.name)
            make_options(cls.Options, dict(spec.options), spec.name)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return ";".join(map(_fmt, v))
    return str(v)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_VALUE = re.compile(r"[^,{}()=\s]+")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, what: str) -> PipelineError:
        return PipelineError(
            f"malformed pipeline '{self.text}' at column {self.pos + 1}: {what}; "
            "write passes as name or name{key=value,...}, separated by commas"
        )

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected '{ch}', found {found}")
        self.pos += 1

    def match(self, regex: re.Pattern, what: str) -> str:
        self.skip_ws()
        m = regex.match(self.text, self.pos)
        if not m:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {what}, found {found}")
        self.pos = m.end()
        return m.group(0)

    def pipeline(self, closing: str = "") -> tuple[Item, ...]:
        items = [self.item()]
        while self.peek() == ",":
            self.pos += 1
            items.append(self.item())
        if self.peek() != closing:
            raise self.error(f"unexpected {self.peek()!r}" if self.peek() else "unexpected end of text")
        return tuple(items)

    def options(self) -> dict[str, str]:
        opts: dict[str, str] = {}
        if self.peek() != "{":
            return opts
        self.pos += 1
        if self.peek() == "}":
            self.pos += 1
            return opts
        while True:
            key = self.match(_NAME, "an option name")
            self.expect("=")
            if key in opts:
                raise self.error(f"option '{key}' given twice")
            opts[key] = self.match(_VALUE, f"a value for '{key}'")
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return opts

    def item(self) -> Item:
        name = self.match(_NAME, "a pass name")
        opts = self.options()
        if name == "fixpoint":
            unknown = set(opts) - {"max_iterations"}
            if unknown:
                raise self.error(f"fixpoint has no option {sorted(unknown)[0]!r} (options: max_iterations)")
            self.expect("(")
            items = self.pipeline(closing=")")
            self.expect(")")
            return FixedPoint(items, _max_iterations(opts.get("max_iterations", DEFAULT_MAX_ITERATIONS)))
        return PassSpec(name, tuple(opts.items()))


def _max_iterations(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise PipelineError(f"fixpoint max_iterations must be a positive integer, got '{value}'")
    return n


def parse(text: str) -> Pipeline:
    """Parse a pipeline string; raises PipelineError pointing at the bad column."""
    if not text or not text.strip():
        raise PipelineError("empty pipeline; give at least one pass, e.g. 'fold,cleanup'")
    p = _Parser(text)
    items = p.pipeline()
    return Pipeline(items)


def load_recipe(path: str | Path) -> Pipeline:
    """Read a TOML recipe (see module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: recipe file not found; check the --recipe path")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{p}: not valid TOML ({exc}); see docs/pipelines.md for the recipe format") from None
    if "pipeline" in data and "passes" not in data:
        return parse(str(data["pipeline"]))
    entries = data.get("passes")
    if not isinstance(entries, list) or not entries:
        raise PipelineError(f"{p}: a recipe needs a [[passes]] list (or pipeline = \"...\"); see docs/pipelines.md")
    return Pipeline(tuple(_recipe_item(e, p) for e in entries))


def _recipe_item(entry: Any, path: Path) -> Item:
    if not isinstance(entry, dict):
        raise PipelineError(f"{path}: each [[passes]] entry must be a table, got {entry!r}")
    if "fixpoint" in entry:
        inner = entry["fixpoint"]
        if not isinstance(inner, list) or not inner:
            raise PipelineError(f"{path}: fixpoint must be a non-empty list of passes")
        return FixedPoint(
            tuple(_recipe_item(e, path) for e in inner),
            _max_iterations(entry.get("max_iterations", DEFAULT_MAX_ITERATIONS)),
        )
    name = entry.get("name")
    if not isinstance(name, str):
        raise PipelineError(f"{path}: a [[passes]] entry has no name = \"...\"")
    opts = entry.get("options", {})
    if not isinstance(opts, dict):
        raise PipelineError(f"{path}: options of pass '{name}' must be a table")
    unknown = set(entry) - {"name", "options"}
    if unknown:
        raise PipelineError(f"{path}: pass '{name}' entry has unknown key(s) {sorted(unknown)}; use options = {{...}}")
    return PassSpec(name, tuple(opts.items()))


def to_toml(pipeline: Pipeline) -> str:
    """The recipe form of a pipeline (round-trips through load_recipe)."""
    def item_toml(it: Item) -> str:
        if isinstance(it, FixedPoint):
            inner = ", ".join(item_toml(i) for i in it.items)
            return f"{{ fixpoint = [{inner}], max_iterations = {it.max_iterations} }}"
        opts = ", ".join(f"{k} = {_toml_value(v)}" for k, v in it.options)
        return f'{{ name = "{it.name}"' + (f", options = {{ {opts} }}" if opts else "") + " }"

    lines = []
    for it in pipeline.items:
        lines.append("[[passes]]")
        if isinstance(it, FixedPoint):
            lines.append("fixpoint = [" + ", ".join(item_toml(i) for i in it.items) + "]")
            lines.append(f"max_iterations = {it.max_iterations}")
        else:
            lines.append(f'name = "{it.name}"')
            if it.options:
                lines.append("options = { " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in it.options) + " }")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

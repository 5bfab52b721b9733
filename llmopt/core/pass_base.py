"""The pass contract: a named class with typed options that mutates an
``onnx_ir.Model`` in place and reports exactly whether it changed it, plus counters.

Built on onnx_ir's pass infrastructure (``InPlacePass``/``PassResult``), so an
llmopt pass can be used anywhere an onnx_ir pass can. Like onnx_ir passes, a pass may state
preconditions (``requires``) and postconditions (``ensures``); the PassManager checks them around
``run`` (see ``llmopt.core.manager``), and so does onnx_ir's ``PassBase.__call__``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections import Counter
from typing import Any, ClassVar

import onnx_ir as ir

from llmopt.errors import PipelineError


class PreconditionError(PipelineError, ir.passes.PreconditionError):
    """What ``Pass.requires`` raises: the model is not ready for this pass (an earlier pass is missing).

    A ``PipelineError`` (one line, exit code 2) and onnx_ir's ``PreconditionError`` (so onnx_ir's own
    pass manager lets it through unwrapped). The message names the pass and what to run first.
    """


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


class Pass(ir.passes.InPlacePass):
    """Base class of every llmopt pass.

    Subclasses set ``name`` (what users type), ``summary`` (one line) and
    ``Options`` (a frozen dataclass with defaults), and implement ``run``,
    which mutates the model and returns whether it changed it. Counters are
    reset at every call; the pass keeps no other state between runs.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        super().__init__()
        if options is None:
            options = make_options(self.Options, kwargs)
        elif kwargs:
            raise TypeError("pass either an Options instance or keyword options, not both")
        self.options = options
        self.counters: Counter[str] = Counter()
        self.explain = False  # set by the PassManager for `--explain NAME`
        self.explanations: list[dict[str, Any]] = []
        self.warnings: list[str] = []

    def run(self, model: ir.Model) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def requires(self, model: ir.Model) -> None:
        """Precondition: raise ``PreconditionError`` when ``model`` is not ready for this pass.

        The PassManager calls it just before ``run`` (after the pass's ``on_start`` progress line);
        so does onnx_ir's ``PassBase.__call__`` when the pass is called directly. The default
        accepts every model. Override it when the pass needs an earlier pass's output and would
        otherwise fail obscurely or do something wrong, and say in one line which pass and what to
        run first::

            def requires(self, model):
                if not any(n.op_type == "GroupQueryAttention" for n in model.graph):
                    raise PreconditionError("prune-heads needs attention fused: run `fuse` before `prune-heads`")

        Keep it cheap and read-only (it must not change the model). For a built-in pass the message
        is shown as written; for a plugin it is prefixed with the pass's position and origin. The
        pipeline stops there: nothing is recorded for the pass and no reproducer is written. A pass
        that is fine leaving a model alone (with ``self.warn``) should do that in ``run`` instead.
        """

    def ensures(self, model: ir.Model) -> None:
        """Postcondition: raise (e.g. ``assert``) when the model this pass returned is not what it promises.

        Called by the PassManager right after ``run`` returned. A failing postcondition is a bug in the
        pass, handled like the pass raising: a built-in keeps its traceback and writes a crash
        reproducer, a plugin stops the compile with a one-line ``PluginError`` naming it. Default: no check.
        """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counters = Counter()
        self.explanations = []
        self.warnings = []
        modified = bool(self.run(model))
        return ir.passes.PassResult(model, modified)

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] += int(n)  # counters are integers (the report's schema says so)

    def warn(self, message: str) -> None:
        """Something the user should know (the compile report and summary list it); not an error."""
        self.warnings.append(message)

    def explain_why(self, **entry: Any) -> None:
        """Record why something did not happen (a rule that did not fire, and the check that failed).

        Passes call this only when ``self.explain`` is set: explaining may cost extra matching.
        """
        self.explanations.append(entry)

    @classmethod
    def describe_options(cls) -> list[dict[str, Any]]:
        """Name, type, default and help of each option (for `llmopt passes`)."""
        out = []
        hints = typing.get_type_hints(cls.Options)
        for f in dataclasses.fields(cls.Options):
            out.append(
                {
                    "name": f.name,
                    "type": _type_name(hints[f.name]),
                    "default": f.default,
                    "help": f.metadata.get("help", ""),
                }
            )
        return out

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with a help string shown by `llmopt passes`."""
    return dataclasses.field(default=default, metadata={"help": help})


def make_options(options_cls: type, raw: dict[str, Any], pass_name: str = "") -> Any:
    """Build an Options instance from user values (strings from a pipeline, or typed from TOML)."""
    where = f"pass '{pass_name}'" if pass_name else options_cls.__name__
    hints = typing.get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    values = {}
    for key, raw_value in raw.items():
        key_norm = key.replace("-", "_")
        if key_norm not in fields:
            known = ", ".join(fields) or "none"
            raise PipelineError(f"{where} has no option '{key}' (options: {known}); see `llmopt passes`")
        values[key_norm] = coerce(raw_value, hints[key_norm], f"{where} option '{key}'")
    try:
        return options_cls(**values)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise PipelineError(f"{where}: {exc}") from None
    except Exception as exc:  # e.g. a plugin validating with `assert`
        raise PipelineError(f"{where}: {type(exc).__name__}: {str(exc).strip() or 'options rejected'}") from None


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert ``value`` to the annotated option type, or raise a PipelineError saying why."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Literal:
        for choice in args:
            if str(value) == str(choice):
                return choice
        raise PipelineError(f"{where} must be one of {', '.join(map(str, args))}, got '{value}'")
    if origin in (typing.Union, types.UnionType):
        if value is None or str(value).lower() == "none":
            if type(None) in args:
                return None
        last: PipelineError | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except PipelineError as exc:
                last = exc
        raise last or PipelineError(f"{where}: bad value '{value}'")
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(";") if v]
        inner = args[0] if args else str
        return tuple(coerce(v, inner, where) for v in items)
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise PipelineError(f"{where} must be true or false, got '{value}'")
    if typ in (int, float):
        if isinstance(value, bool):
            raise PipelineError(f"{where} must be a number, got '{value}'")
        try:
            return typ(value) if typ is float or not isinstance(value, float) else _exact_int(value)
        except (TypeError, ValueError):
            raise PipelineError(f"{where} must be {'an integer' if typ is int else 'a number'}, got '{value}'") from None
    if typ is str:
        return str(value)
    return value


def _exact_int(v: float) -> int:
    if v != int(v):
        raise ValueError
    return int(v)


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(t)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t) if a is not type(None)) + " (optional)"
    if origin in (tuple, list):
        return f"list of {_type_name(typing.get_args(t)[0])} (a;b;c)"
    return getattr(t, "__name__", str(t))

"""Every setting of a compile, as one frozen value: ``CompileOptions``.

The command line (``llmopt compile``) and the Python API (``llmopt.compile``) both build one and
hand it to ``llmopt.compiler.driver.compile``; a bad value is refused here, with one line naming
the flag (or keyword) and what it accepts, before anything is read or written::

    opts = CompileOptions(target="cpu-fp32", out="out/", measure_speed=False)
    llmopt.compile("model.onnx", options=opts)
    llmopt.compile("model.onnx", options=opts, target="cpu-int8")   # keywords override options
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from llmopt.compiler.gates import Gates
from llmopt.errors import InputError

# The verification thresholds a compile may override, with the values each accepts
# (the fields of llmopt.ort.verify.Thresholds; tests/test_compile_options.py checks they agree).
THRESHOLD_RANGES = {"max_abs": (0.0, math.inf), "min_cosine": (-1.0, 1.0), "min_top1": (0.0, 1.0)}

# How a setting is named on the command line, for messages (the others are Python keywords only).
_FLAGS = {
    "target": "--target", "out": "-o", "passes": "--passes", "recipe": "--recipe", "verify_model": "--verify",
    "verify_each": "--verify-each", "with_past": "--with-past", "eval_text": "--eval-text",
    "eval_tokens": "--eval-tokens", "measure_speed": "--speed", "report_path": "--report",
    "explain": "--explain", "plugins": "--plugin", "max_ppl_increase": "--max-ppl-increase",
    "min_speedup": "--min-speedup",
}
_PATHS = ("out", "recipe", "eval_text", "report_path")
_BOOLS = ("verify_model", "verify_each", "with_past", "measure_speed", "check_plugins")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """How to compile: the target, where to write, what to verify, measure and gate.

    Each field is also a keyword of ``llmopt.compile`` (and, where it has one, the ``llmopt compile``
    flag in brackets). Paths may be given as strings; they are kept as ``Path``.
    """

    target: str = "cpu-int8"  # a registered target (`llmopt targets`) [--target]
    out: Path | None = None  # the artifact directory; None: <model name>-<target> in the working directory [-o]
    passes: str | None = None  # a pipeline replacing the target's [--passes]
    recipe: Path | None = None  # a TOML recipe replacing the target's pipeline [--recipe]
    verify_model: bool = True  # compare compiled vs source in ONNX Runtime [--verify/--no-verify]
    verify_each: bool = False  # checker + numeric check after every pass [--verify-each]
    with_past: bool = True  # Hugging Face sources: export with KV-cache I/O [--with-past/--no-past]
    eval_text: Path | None = None  # text for perplexity; None: a Hugging Face directory's eval.txt [--eval-text]
    eval_tokens: int = 8192  # tokens of the eval text to use (0: all) [--eval-tokens]
    measure_speed: bool = True  # single-token latency, source vs compiled [--speed/--no-speed]
    speed_pairs: int = 15  # alternating source/compiled timing pairs
    report_path: Path | None = None  # also write the manifest here, on failure too [--report]
    thresholds: Mapping[str, float] = dataclasses.field(default_factory=dict, hash=False)  # [--threshold K=V]
    progress: Callable[[str], None] | None = dataclasses.field(default=None, compare=False)  # one call per step
    explain: tuple[str, ...] = ()  # passes that record why their rules did not fire [--explain]
    max_ppl_increase: float | None = None  # gate: a fraction, 0.01 = 1% [--max-ppl-increase]
    min_speedup: float | None = None  # gate: single-token latency, source over compiled [--min-speedup]
    plugins: tuple[Path, ...] = ()  # Python files whose passes to register [--plugin]
    check_plugins: bool = True  # check plugin passes after they run [--trust-plugins turns it off]

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize once, here
        if not isinstance(self.target, str) or not self.target:
            raise InputError(f"{_named('target', self.target)}: give a target name, e.g. 'cpu-int8' (`llmopt targets` lists them)")
        for name in _PATHS:
            set_(self, name, _path(name, getattr(self, name)))
        if self.passes is not None and not isinstance(self.passes, str):
            raise InputError(f"{_named('passes', self.passes)}: give a pipeline string, e.g. 'fold,cleanup,quantize-dynamic'")
        if self.passes is not None and self.recipe is not None:
            raise InputError("give --passes or --recipe, not both")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}={getattr(self, name)!r}: must be True or False")  # the CLI gives a bool
        _check_int("eval_tokens", self.eval_tokens, 0, " (0 means the whole text)")
        _check_int("speed_pairs", self.speed_pairs, 1)
        set_(self, "thresholds", _thresholds(self.thresholds))
        if self.progress is not None and not callable(self.progress):
            raise InputError(f"{_named('progress', self.progress)}: must be a function taking one str, or None")
        set_(self, "explain", _names("explain", self.explain))
        set_(self, "plugins", tuple(_path("plugins", p) for p in _sequence(self.plugins)))
        for name in ("max_ppl_increase", "min_speedup"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InputError(f"{_named(name, value)}: must be a number")
        self.gates()  # the gates' own ranges

    @classmethod
    def build(cls, options: "CompileOptions | None" = None, /, **settings: Any) -> "CompileOptions":
        """``options`` (or the defaults) with ``settings`` replacing fields; an unknown name is a
        ``TypeError``, as for any Python keyword."""
        known = {f.name for f in dataclasses.fields(cls)}
        for name in settings:
            if name not in known:
                raise TypeError(f"compile() got an unexpected keyword argument '{name}'")
        if options is None:
            return cls(**settings)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a CompileOptions, not {type(options).__name__}")
        return dataclasses.replace(options, **settings) if settings else options

    def gates(self) -> Gates:
        return Gates(self.max_ppl_increase, self.min_speedup)

    def log(self, msg: str) -> None:
        """One progress line (the CLI prints it to stderr; the API is silent unless ``progress`` is set)."""
        if self.progress is not None:
            self.progress(msg)


def _named(name: str, value: Any) -> str:
    """A setting and its value as the user gave it: ``--eval-tokens -5`` or ``speed_pairs=0``."""
    return f"{_FLAGS[name]} {value!r}" if name in _FLAGS else f"{name}={value!r}"


def _path(name: str, value: Any) -> Path | None:
    if value is None or isinstance(value, Path):
        return value
    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value)
    raise InputError(f"{_named(name, value)}: must be a path (a str or os.PathLike)")


def _sequence(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (value,)
    return tuple(value)


def _names(name: str, value: Any) -> tuple[str, ...]:
    names = _sequence(value)
    for item in names:
        if not isinstance(item, str) or not item:
            raise InputError(f"{_named(name, item)}: must be a pass name, e.g. 'fuse'")
    return names


def _check_int(name: str, value: Any, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{_named(name, value)}: must be an integer >= {low}{note}")


def _thresholds(value: Mapping[str, Any] | None) -> dict[str, float]:
    """The overrides as floats, each a known threshold within its range."""
    out = {}
    for key, raw in dict(value or {}).items():
        if key not in THRESHOLD_RANGES:
            raise InputError(f"unknown threshold '{key}'; use one of {', '.join(sorted(THRESHOLD_RANGES))}")
        lo, hi = THRESHOLD_RANGES[key]
        try:
            number = float(raw)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(raw, bool) or not (math.isfinite(number) or number == math.inf and key == "max_abs") \
                or not lo <= number <= hi:
            raise InputError(f"--threshold {key}={raw}: must be a number in [{lo:g}, {hi:g}]")
        out[key] = number
    return out

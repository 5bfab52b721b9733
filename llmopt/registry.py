"""Name → pass class and name → target registries.

Built-in passes live in ``llmopt.passes`` and built-in targets in
``llmopt.targets``; plugins arrive through the entry-point groups
``llmopt.passes`` and ``llmopt.targets`` (each entry point names a Pass
subclass or a Target instance).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib import metadata
from typing import TYPE_CHECKING

from llmopt.errors import PipelineError
from llmopt.pass_base import Pass

if TYPE_CHECKING:
    from llmopt.targets.base import Target

_PASSES: dict[str, type[Pass]] = {}
_TARGETS: dict[str, "Target"] = {}
_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"pass name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}")
    _PASSES[cls.name] = cls
    return cls


def register_target(target: "Target") -> "Target":
    existing = _TARGETS.get(target.name)
    if existing is not None and existing is not target:
        raise ValueError(f"target name '{target.name}' is already registered")
    _TARGETS[target.name] = target
    return target


def _load_builtins_and_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in ("llmopt.passes", "llmopt.targets"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{info.name}")
    for ep in metadata.entry_points(group="llmopt.passes"):
        obj = ep.load()
        if not (isinstance(obj, type) and issubclass(obj, Pass)):
            raise PipelineError(f"plugin entry point '{ep.name}' ({ep.value}) is not an llmopt Pass subclass")
        register_pass(obj)
    for ep in metadata.entry_points(group="llmopt.targets"):
        register_target(ep.load())


def get_pass(name: str) -> type[Pass]:
    _load_builtins_and_plugins()
    try:
        return _PASSES[name]
    except KeyError:
        raise PipelineError(f"unknown pass '{name}'{_suggest(name, _PASSES)}; `llmopt passes` lists them") from None


def get_target(name: str) -> "Target":
    _load_builtins_and_plugins()
    try:
        return _TARGETS[name]
    except KeyError:
        raise PipelineError(f"unknown target '{name}'{_suggest(name, _TARGETS)}; `llmopt targets` lists them") from None


def all_passes() -> dict[str, type[Pass]]:
    _load_builtins_and_plugins()
    return dict(sorted(_PASSES.items()))


def all_targets() -> dict[str, "Target"]:
    _load_builtins_and_plugins()
    return dict(_TARGETS)


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""

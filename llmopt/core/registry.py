"""Name → pass class and name → target registries.

Built-in passes live in ``llmopt.passes`` and built-in targets in
``llmopt.targets``; plugins arrive through the entry-point groups
``llmopt.passes`` and ``llmopt.targets`` (each entry point names a Pass
subclass or a Target instance), through ``--plugin FILE`` (``llmopt.core.plugins``)
or through ``register_pass`` called from Python. Every pass remembers where it
came from (``origin``): a plugin's failures are reported against it.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from importlib import metadata
from typing import TYPE_CHECKING

from llmopt.errors import PipelineError, PluginError, first_line
from llmopt.core.pass_base import Pass

if TYPE_CHECKING:
    from llmopt.targets.base import Target

_PASSES: dict[str, type[Pass]] = {}
_ORIGINS: dict[str, str] = {}
_TARGETS: dict[str, "Target"] = {}
_loaded = False
_origin_hint: str | None = None
_PLUGIN_FILES: dict[str, "os.PathLike"] = {}
BUILTIN = "built-in"


def register_pass(cls: type[Pass] | None = None, *, origin: str | None = None):
    """Make a pass available by its ``name`` (usable as a class decorator).

    ``origin`` says where it came from (shown by `llmopt passes`, used in error messages);
    by default "built-in" for llmopt's own passes and the defining module otherwise.
    """
    if cls is None:
        return lambda c: register_pass(c, origin=origin)
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass takes an llmopt Pass subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name; set the class attribute `name`")
    builtin = cls.__module__.startswith("llmopt.passes.")
    if not builtin:
        _check_options_class(cls)
        _load_builtins_and_plugins()  # a plugin must not take a built-in's name before it loads
    existing = _PASSES.get(cls.name)
    rerun = existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
    if existing is not None and existing is not cls and not rerun:  # a notebook cell run twice replaces its pass
        raise ValueError(f"pass name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__} "
                         f"({_ORIGINS.get(cls.name)}); choose another name")
    _PASSES[cls.name] = cls
    _ORIGINS[cls.name] = origin or _origin_hint or (BUILTIN if builtin else f"python module {cls.__module__}")
    return cls


def _check_options_class(cls: type[Pass]) -> None:
    """A plugin's Options must be a dataclass whose annotations resolve (``llmopt passes`` and pipelines read them)."""
    import dataclasses
    import typing

    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"pass '{cls.name}': Options must be a frozen dataclass (see llmopt.core.pass_base.option)")
    try:
        typing.get_type_hints(cls.Options)
    except Exception as exc:  # e.g. a name used in an annotation but never imported
        raise ValueError(f"pass '{cls.name}': the annotations of its Options do not resolve "
                         f"({type(exc).__name__}: {first_line(exc)})") from None


def set_origin_hint(origin: str | None) -> None:
    """While a plugin module is imported, passes it registers are attributed to it."""
    global _origin_hint
    _origin_hint = origin


def set_plugin_file(name: str, path) -> None:
    _PLUGIN_FILES[name] = path


def plugin_files() -> dict[str, "os.PathLike"]:
    """Pass name → the --plugin file it came from (for reproducers)."""
    return dict(_PLUGIN_FILES)


def registered(name: str) -> type[Pass] | None:
    _load_builtins_and_plugins()
    return _PASSES.get(name)


def origin(name: str) -> str:
    """Where pass ``name`` came from: "built-in", "entry point ...", "plugin file ...", "python module ..."."""
    _load_builtins_and_plugins()
    return _ORIGINS.get(name, "unknown")


def is_builtin(name: str) -> bool:
    return origin(name) == BUILTIN


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
        where = f"entry point '{ep.name}' = {ep.value}" + (f" of {ep.dist.name} {ep.dist.version}" if ep.dist else "")
        try:
            obj = ep.load()
        except Exception as exc:  # an installed plugin that cannot import: name it, no traceback
            raise PluginError(f"plugin {where} failed to import: {type(exc).__name__}: {first_line(exc)}; "
                              "fix or uninstall that package") from None
        if not (isinstance(obj, type) and issubclass(obj, Pass)):
            raise PluginError(f"plugin {where} is not an llmopt Pass subclass")
        try:
            register_pass(obj, origin=where)
        except ValueError as exc:
            raise PluginError(f"plugin {where}: {exc}") from None
    for ep in metadata.entry_points(group="llmopt.targets"):
        where = f"entry point '{ep.name}' = {ep.value}" + (f" of {ep.dist.name} {ep.dist.version}" if ep.dist else "")
        try:
            register_target(ep.load())
        except Exception as exc:
            raise PluginError(f"target plugin {where} failed to load: {type(exc).__name__}: {first_line(exc)}; "
                              "fix or uninstall that package") from None


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

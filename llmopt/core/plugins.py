"""Users' own passes: loading them, and holding them to account.

A plugin pass arrives three ways:

- an installed package declares it in the entry-point group ``llmopt.passes``
  (``[project.entry-points."llmopt.passes"] my-pass = "my_pkg:MyPass"``);
- ``llmopt compile ... --plugin path/to/file.py`` imports a file; every ``Pass`` subclass
  with a ``name`` defined in it is registered;
- Python code calls ``llmopt.register_pass`` (or uses it as a class decorator).

Built-in passes are llmopt's responsibility: a crash there is a bug and keeps its traceback.
A plugin pass is the user's code, so the PassManager checks it (see ``PluginGuard``) and a plugin
that raises, returns a broken graph, or moves the logits beyond the target's thresholds stops the
compile with a one-line ``PluginError`` naming the pass and where it came from (exit code 1,
nothing written).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from llmopt.errors import InputError, PluginError, first_line
from llmopt.core.pass_base import Pass


def load_plugin_file(path: str | os.PathLike) -> list[str]:
    """Import a Python file and register the passes it defines; returns their names."""
    from llmopt.core import registry

    p = Path(path)
    if not p.exists():
        raise InputError(f"--plugin {p}: no such file; give the path of a .py file defining an llmopt Pass")
    if p.suffix != ".py" or not p.is_file():
        raise InputError(f"--plugin {p}: not a .py file; give the path of a Python file defining an llmopt Pass")
    resolved = p.resolve()
    module_name = f"llmopt_plugin_{p.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:  # the same file twice (e.g. two compiles in one process)
        return [name for name, path in registry.plugin_files().items() if path == resolved]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    before = set(registry.all_passes())
    registry.set_origin_hint(f"plugin file {p}")
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: report where, not a traceback
        sys.modules.pop(module_name, None)
        raise PluginError(f"plugin file {p} failed to import: {_where(exc, resolved)}{type(exc).__name__}: "
                          f"{first_line(exc)}") from None
    finally:
        registry.set_origin_hint(None)
    names = sorted(set(registry.all_passes()) - before)  # registered while it ran (register_pass, rule_pass)
    for cls in _passes_of_classes(module):
        if registry.registered(cls.name) is not cls:
            try:
                registry.register_pass(cls, origin=f"plugin file {p}")
            except ValueError as exc:  # a name clash
                raise PluginError(f"plugin file {p}: {exc}") from None
        if cls.name not in names:
            names.append(cls.name)
    for name in names:
        registry.set_plugin_file(name, resolved)
    if not names:
        raise PluginError(f"plugin file {p} defines no llmopt pass (a Pass subclass with a `name`); "
                          "see docs/writing-passes.md")
    return names


def _passes_of_classes(module) -> list[type[Pass]]:
    return [
        obj for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Pass) and obj.__module__ == module.__name__ and obj.name
    ]


def _where(exc: BaseException, file: Path) -> str:
    """``line N: `` of the deepest frame in ``file`` (or of a SyntaxError), if any."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"line {exc.lineno}: "
    tb, line = exc.__traceback__, None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == file:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"line {line}: " if line else ""


def plugin_frame(exc: BaseException, cls: type) -> str:
    """`` at file.py:N`` for the deepest traceback frame inside the plugin's own source file."""
    try:
        source = Path(inspect.getfile(cls)).resolve()
    except (TypeError, OSError):
        return ""
    tb, where = exc.__traceback__, ""
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == source:
            where = f" at {source.name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where

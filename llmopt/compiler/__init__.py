"""Compile: source model -> pipeline -> verified artifact (options, plan, run, measure, manifest,
publish), and the gates a CI job puts on it."""

_LAZY = {"compile": "driver", "Artifact": "driver", "CompileOptions": "options"}


def __getattr__(name):  # `llmopt.compiler.compile` without importing the whole driver up front
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"llmopt.compiler.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'llmopt.compiler' has no attribute {name!r}")

"""Compile: source model -> pipeline -> verified artifact (options, plan, run, measure, manifest,
publish), and the gates a CI job puts on it."""


def __getattr__(name):  # `llmopt.compiler.compile` without importing the whole driver up front
    if name in ("compile", "Artifact"):
        from llmopt.compiler import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'llmopt.compiler' has no attribute {name!r}")

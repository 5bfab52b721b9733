"""llmopt: a compiler-style graph optimization toolchain for serving LLMs.

Public API::

    import llmopt
    art = llmopt.compile("model.onnx", target="cpu-int8", out="out/")
    art.report            # the manifest (llmopt.json) as a dict
    llmopt.inspect_model("model.onnx")
"""

from llmopt.errors import (
    InputError,
    LlmoptError,
    MissingDependencyError,
    OutputError,
    PipelineError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "InputError",
    "LlmoptError",
    "MissingDependencyError",
    "OutputError",
    "PipelineError",
    "VerificationError",
    "compile",
    "export",
    "inspect_model",
    "load",
    "run_pipeline",
]


def __getattr__(name):  # lazy: `import llmopt` stays cheap and torch-free
    if name in ("compile", "Artifact"):
        from llmopt import compiler

        return getattr(compiler, name)
    if name == "export":
        from llmopt.export import export

        return export
    if name == "inspect_model":
        from llmopt.inspector import inspect_model

        return inspect_model
    if name == "load":
        from llmopt.ir import load

        return load
    if name == "run_pipeline":
        from llmopt.manager import run_pipeline

        return run_pipeline
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")

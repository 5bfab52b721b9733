"""llmopt: a compiler-style graph optimization toolchain for serving LLMs.

Public API (results are objects; nothing is printed)::

    import llmopt
    art = llmopt.compile("model.onnx", target="cpu-int8", out="out/",
                         eval_text="eval.txt", max_ppl_increase=0.01, min_speedup=2.0)
    art.report            # the manifest (llmopt.json) as a dict; art.speedup, art.perplexity_change
    llmopt.evaluate("out/", "eval.txt", baseline="model.onnx").perplexity_change
    llmopt.benchmark("out/", batches=(1, 8)).decode_tokens_per_s(8)
    llmopt.inspect_model("model.onnx")

Writing passes (docs/writing-passes.md): ``llmopt.Pass``, ``llmopt.option``,
``llmopt.register_pass``, ``llmopt.load_plugin``, and ``llmopt.core.rules`` for pattern rules.
"""

from llmopt.errors import (
    InputError,
    LlmoptError,
    MissingDependencyError,
    OutputError,
    PipelineError,
    PluginError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "BenchResult",
    "CompileOptions",
    "EvalResult",
    "GateError",
    "InputError",
    "LlmoptError",
    "MissingDependencyError",
    "OutputError",
    "Pass",
    "PipelineError",
    "PluginError",
    "VerificationError",
    "benchmark",
    "compile",
    "evaluate",
    "export",
    "inspect_model",
    "load",
    "load_plugin",
    "option",
    "register_pass",
    "run_pipeline",
]

_LAZY = {  # name -> (module, attribute): `import llmopt` stays cheap and torch-free
    "compile": ("llmopt.compiler.driver", "compile"),
    "Artifact": ("llmopt.compiler.driver", "Artifact"),
    "CompileOptions": ("llmopt.compiler.options", "CompileOptions"),
    "export": ("llmopt.frontend.exporter", "export"),
    "inspect_model": ("llmopt.frontend.inspector", "inspect_model"),
    "load": ("llmopt.core.model_io", "load"),
    "run_pipeline": ("llmopt.core.manager", "run_pipeline"),
    "evaluate": ("llmopt.api", "evaluate"),
    "benchmark": ("llmopt.api", "benchmark"),
    "EvalResult": ("llmopt.api", "EvalResult"),
    "BenchResult": ("llmopt.api", "BenchResult"),
    "GateError": ("llmopt.compiler.gates", "GateError"),
    "Pass": ("llmopt.core.pass_base", "Pass"),
    "option": ("llmopt.core.pass_base", "option"),
    "register_pass": ("llmopt.core.registry", "register_pass"),
    "load_plugin": ("llmopt.core.plugins", "load_plugin_file"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")

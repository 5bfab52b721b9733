"""Plan: what a compile will read, run and write, resolved and checked before any export or pass.

``make_plan(model, options)`` loads the plugins, resolves the target (its thresholds overridden by
``options.thresholds``) and the pipeline (the target's, ``--passes`` or ``--recipe``), finds what
the model is (an ONNX file, opened and validated without reading weights, or a Hugging Face
directory to export), picks the default eval text and output directory, and then checks every
path the compile reads or writes (``llmopt.compiler.preflight``) and sweeps away what killed runs
left at those places. Everything that can be refused is refused here, in milliseconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llmopt.compiler import preflight
from llmopt.compiler.gates import Gates
from llmopt.compiler.options import CompileOptions
from llmopt.core import atomic, model_io
from llmopt.core.manager import check_explain
from llmopt.core.pipeline import Pipeline, load_recipe, parse
from llmopt.core.plugins import load_plugin_file
from llmopt.core.registry import get_target
from llmopt.errors import InputError


@dataclasses.dataclass(frozen=True)
class Source:
    """An ONNX source, opened: its file, the IR (weights memory-mapped) and every file it reads."""

    file: Path
    model: Any
    files: list[Path]


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str  # the model as the user named it (a path, or 'reference')
    options: CompileOptions
    target: Any  # llmopt.targets.base.Target, with options.thresholds applied
    pipeline: Pipeline
    out: Path
    hf_dir: Path | None  # a Hugging Face directory, exported first
    source: Source | None  # an ONNX source, opened (None when exported)
    eval_text: Path | None  # options.eval_text, or a Hugging Face directory's eval.txt
    gates: Gates

    @property
    def source_dir(self) -> Path:
        """Where the source's tokenizer and config may be."""
        return self.hf_dir if self.hf_dir is not None else self.source.file.parent


def make_plan(model: str | Any, options: CompileOptions) -> Plan:
    gates = options.gates()
    for plugin in options.plugins:
        load_plugin_file(plugin)
    target = get_target(options.target)
    if options.thresholds:
        target = dataclasses.replace(target, thresholds=dataclasses.replace(target.thresholds, **options.thresholds))
    pipeline = resolve_pipeline(target, options)
    pipeline.validate()  # unknown passes/options fail before any work
    check_explain(pipeline, options.explain)  # before any export or load
    from llmopt.frontend.exporter import resolve_hf_dir

    hf_dir = resolve_hf_dir(model)
    eval_text = options.eval_text
    if eval_text is None and hf_dir is not None and (hf_dir / "eval.txt").is_file() and (hf_dir / "tokenizer.json").is_file():
        eval_text = hf_dir / "eval.txt"
    gates.require(has_eval_text=eval_text is not None, measure_speed=options.measure_speed)
    out = options.out if options.out is not None else Path(f"{Path(model).name.removesuffix('.onnx')}-{target.name}")
    source = _open_source(model, hf_dir)  # validates the ONNX file (external data included); reads no weights
    plan = Plan(str(model), options, target, pipeline, out, hf_dir, source, eval_text, gates)
    _preflight(plan)
    return plan


def resolve_pipeline(target, options: CompileOptions) -> Pipeline:
    """``--passes``, else ``--recipe``, else the target's own pipeline (options refuse both at once)."""
    if options.passes is not None:
        return parse(options.passes)
    if options.recipe is not None:
        return load_recipe(options.recipe)
    return target.parsed_pipeline()


def _open_source(model, hf_dir: Path | None) -> Source | None:
    if hf_dir is not None:
        return None  # exported later, into the work directory
    src_file = model_io.resolve_model_file(model)
    ir_model = model_io.load(src_file)
    return Source(src_file, ir_model, model_io.model_files(src_file, ir_model))


def _preflight(plan: Plan) -> None:
    """Every path the compile reads or writes, checked before any export or pass; then what killed
    earlier runs left at those places is swept away."""
    options = plan.options
    if plan.source is not None:
        inputs = [("model", plan.source.file)] + [("external data", f) for f in plan.source.files[1:]]
    else:
        inputs = preflight.directory_inputs("model file", plan.hf_dir)
    inputs += [("plugin", p) for p in options.plugins]
    if options.recipe is not None:
        inputs.append(("recipe", options.recipe))
    if plan.eval_text is not None:
        inputs.append(("eval text", preflight.check_text(plan.eval_text, "--eval-text")))
        if not (plan.source_dir / "tokenizer.json").is_file():
            raise InputError(f"{plan.source_dir.resolve()}: no tokenizer.json to tokenize --eval-text with; "
                             "put the model's tokenizer.json next to the model")
    outputs = [preflight.Output("-o", plan.out, "dir", artifact=True)]
    if options.report_path is not None:
        outputs.append(preflight.Output("--report", options.report_path))
    preflight.check(inputs, outputs)
    for o in outputs:
        atomic.sweep(o.path)
    atomic.sweep_work_dirs()

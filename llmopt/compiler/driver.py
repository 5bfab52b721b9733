"""`llmopt compile`: source model → pipeline → artifact directory, verified.

``compile`` is the one entry point of the command line and the Python API; it takes a
``CompileOptions`` (or builds one from keywords) and runs the steps, each in its own module:

- ``plan``: target, pipeline, paths resolved; every input and output checked (pre-flight);
- ``run``: the source loaded (exported first if it is a Hugging Face directory), the pipeline run;
- ``publish``: the artifact staged in a temporary sibling directory (``publish.staging``);
- ``manifest``: its llmopt.json built; ``measure``: verification, speed, perplexity added;
- the verdicts (ops the provider lacks, the accuracy budget, the gates), then ``publish``: the
  directory renamed into place, only when everything succeeded.

A failed compile leaves nothing half-written, and the input is never touched.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from llmopt.compiler import manifest as manifests
from llmopt.compiler import measure, publish, run
from llmopt.compiler.gates import GateError
from llmopt.compiler.options import CompileOptions
from llmopt.compiler.plan import Plan, make_plan
from llmopt.core import atomic, model_io
from llmopt.errors import InputError, VerificationError
from llmopt.reporting.files import load_json

MANIFEST = publish.MANIFEST
SCHEMA = manifests.SCHEMA


@dataclasses.dataclass
class Artifact:
    """A compiled model directory and its manifest (llmopt.json)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def report(self) -> dict[str, Any]:
        """The manifest, under the name the CLI's ``--report`` gives it."""
        return self.manifest

    @property
    def model_path(self) -> Path:
        return self.path / model_io.MODEL_FILE

    @property
    def size_ratio(self) -> float | None:
        """Artifact bytes (graph + weights) over source bytes."""
        return self.manifest["artifact"]["size_ratio"]

    @property
    def speedup(self) -> float | None:
        """Single-token latency, source over compiled (median of alternating pairs), if measured."""
        return (self.manifest.get("speed") or {}).get("speedup")

    @property
    def perplexity_change(self) -> float | None:
        """Compiled perplexity over the source's, minus 1, if an eval text was given."""
        return (self.manifest.get("accuracy") or {}).get("perplexity_change")

    @property
    def gates(self) -> list[dict[str, Any]]:
        return self.manifest.get("gates", [])

    def to_dict(self) -> dict[str, Any]:
        """The manifest (llmopt.json), which is what `llmopt compile --json` prints."""
        return self.manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Artifact":
        p = Path(path)
        if not (p / MANIFEST).is_file():
            raise InputError(f"{p}: not an llmopt artifact (no {MANIFEST}); compile a model into it first")
        return cls(p, load_json(p / MANIFEST, "recompile the artifact"))


def compile(  # noqa: A001 - the public name users expect
    model: str | os.PathLike,
    target: str | CompileOptions | None = None,
    out: str | os.PathLike | None = None,
    *,
    options: CompileOptions | None = None,
    **settings: Any,
) -> Artifact:
    """Compile ``model`` (an .onnx file, a directory holding one, or a Hugging Face model
    directory, exported first; ``"reference"``: the bundled model) into the directory ``out``.

    How is a ``CompileOptions`` (``options``, or the second argument), and any of its fields as
    keywords (``target``, ``out``, ``measure_speed``, ``max_ppl_increase``, ...), which replace
    the options' own. See ``CompileOptions`` for each setting.

    Raises ``VerificationError`` (exit code 1 on the CLI) when the compiled model misses the
    target's thresholds and ``GateError`` (a VerificationError) when it misses a gate: the
    artifact is then not written, the manifest still is (to ``report_path`` if given, and on the
    exception's ``report``). ``PluginError`` (exit code 1) when a plugin pass fails: the pipeline
    stopped, so there is no manifest, only the error naming the pass (and a reproducer file).
    """
    if isinstance(target, CompileOptions):  # compile(model, CompileOptions(...))
        if options is not None:
            raise TypeError("compile() got options twice (positionally and as options=)")
        options, target = target, None
    given = {name: value for name, value in (("target", target), ("out", out)) if value is not None}
    opts = CompileOptions.build(options, **given, **settings)
    started = time.perf_counter()
    plan = make_plan(model, opts)
    work = atomic.work_dir()
    try:
        manifest = _compile(plan, work, started)
    except VerificationError as exc:
        if opts.report_path is not None and exc.report is not None:
            publish.write_json(opts.report_path, exc.report)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if opts.report_path is not None:
        publish.write_json(opts.report_path, manifest)
    return Artifact(plan.out, json.loads(json.dumps(manifest, default=str)))  # exactly what llmopt.json holds


compile.__signature__ = inspect.signature(compile).replace(parameters=[  # help(): every keyword, with its default
    *list(inspect.signature(compile).parameters.values())[:4],
    *(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                        default=f.default if f.default is not dataclasses.MISSING else f.default_factory())
      for f in dataclasses.fields(CompileOptions) if f.name not in ("target", "out")),
])


def _compile(plan: Plan, work: Path, started: float) -> dict[str, Any]:
    loaded = run.load(plan, work)
    result = run.run_pipeline(plan, loaded)
    with publish.staging(plan.out) as staging:
        manifest = _stage(plan, loaded, result, staging)
        src_file, compiled_file = loaded.file, staging / model_io.MODEL_FILE
        del loaded, result  # the compiled IR: from here on, ONNX Runtime reads the staged files
        measure.run_all(plan, src_file, compiled_file, manifest)
        _check(plan, manifest)
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        publish.publish(staging, plan.out, manifest)
    return manifest


def _stage(plan: Plan, loaded: run.Loaded, result, staging: Path) -> dict[str, Any]:
    """The pipeline's result staged; the manifest so far. Refuses a graph holding ops the target's
    provider does not implement."""
    plan.options.log(f"save    {plan.out}/ (external data)")
    staged = publish.stage(result.model, staging, plan.source_dir, plan.target.provider)
    manifest = manifests.build(plan, loaded, result, staged)
    unsupported = plan.target.unsupported_ops(result.model)
    if unsupported:
        raise VerificationError(
            f"the compiled graph holds ops {plan.target.provider} does not implement: {', '.join(unsupported)}; "
            f"nothing was written (they would run on the CPU provider, copying data every step)", manifest)
    return manifest


def _check(plan: Plan, manifest: dict[str, Any]) -> None:
    """The accuracy budget, then the gates; a miss raises (with the manifest) and nothing is published."""
    verification = manifest["verification"]
    if verification is not None and not verification["passed"]:
        raise VerificationError(
            f"compiled model misses the {plan.target.name} accuracy budget: {'; '.join(verification['misses'])}; "
            "nothing was written (loosen the pipeline, or see --verify-each for the pass at fault)", manifest)
    manifest["gates"] = plan.gates.evaluate(manifest)
    missed = [g["text"] for g in manifest["gates"] if not g["passed"]]
    if missed:
        raise GateError(f"compiled model misses its gate{'s' if len(missed) > 1 else ''}: {'; '.join(missed)}; "
                        "nothing was written (the report says by how much)", manifest)

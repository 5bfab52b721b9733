"""The PassManager: runs a pipeline over an ``onnx_ir.Model``, fixed points included, every pass
through a list of instruments (``llmopt.core.instruments``, MLIR's PassInstrumentation): timing,
node and byte deltas, optional verify-each, the plugin guard, one-line plugin errors, a crash
reproducer and progress callbacks. The pass itself is run by its contract: ``requires``, ``run``,
``ensures`` (``llmopt.core.pass_base``).

Passes that are not built in (plugins, see ``llmopt.core.plugins``) are guarded: an exception, a
graph the ONNX checker or ONNX Runtime rejects, or logits moved beyond the thresholds relative to
the model the pass was given stop the pipeline with a ``PluginError`` naming the pass."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import onnx_ir as ir

from llmopt.core import registry
from llmopt.core.instruments import (
    PassInstrument,
    PassRun,
    PluginErrors,
    PluginGuard,
    Progress,
    Reproducer,
    Statistics,
    Timing,
    VerifyEach,
    plugin_failure,
)
from llmopt.core.pass_base import Pass, make_options
from llmopt.core.pipeline import FixedPoint, Item, PassSpec, Pipeline
from llmopt.core.registry import get_pass
from llmopt.errors import PipelineError
from llmopt.ort import verify


@dataclasses.dataclass
class PassRecord:
    """What one pass run did (one entry of the manifest's ``passes`` list)."""

    name: str
    options: dict[str, Any]
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    counters: dict[str, int]
    iteration: int | None = None
    verify: dict[str, Any] | None = None
    explanations: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seconds"] = round(self.seconds, 4)
        if self.iteration is None:
            d.pop("iteration")
        if self.verify is None:
            d.pop("verify")
        if self.explanations is None:
            d.pop("explanations")
        return d


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    modified: bool
    records: list[PassRecord]
    warnings: list[str]


class PassManager:
    """Runs a Pipeline; every pass is instrumented and, with ``verify_each``, checked."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        verify_each: bool = False,
        thresholds: verify.Thresholds | None = None,
        on_start: Callable[[int, PassSpec], None] | None = None,
        on_end: Callable[[int, PassRecord], None] | None = None,
        source: str | None = None,
        explain: Iterable[str] = (),
        check_plugins: bool = True,
        instruments: Iterable[PassInstrument] = (),
    ):
        """``instruments``: more hooks around every pass, outside the built-in ones (their ``before``
        runs first and their ``after``/``failed`` last, seeing the error the pipeline will raise)."""
        pipeline.validate()
        self.pipeline = pipeline
        self.verify_each = verify_each
        self.thresholds = thresholds or verify.Thresholds(min_cosine=0.99)
        self.on_start = on_start
        self.on_end = on_end
        self.source = source
        self.explain = check_explain(pipeline, explain)
        self.check_plugins = check_plugins
        self.instruments = list(instruments)
        self._records: list[PassRecord] = []
        self._warnings: list[str] = []
        self._instruments: list[PassInstrument] = []

    def run(self, model: ir.Model) -> PipelineResult:
        self._records, self._warnings = [], []
        self._instruments = self._make_instruments(model)
        modified = self._run_items(model, self.pipeline.items, iteration=None)
        return PipelineResult(model, modified, self._records, self._warnings)

    def _make_instruments(self, model: ir.Model) -> list[PassInstrument]:
        """Outermost first; the order is today's behaviour: on_start before the guard draws its
        reference, the timer around the pass alone, the record complete before the guard and
        verify-each check it (guard first), on_end only once both passed, and a crash's reproducer
        written before a plugin's one-line error names it."""
        return [
            *self.instruments,
            Progress(self.on_start, self.on_end),
            *([VerifyEach(model, self.thresholds)] if self.verify_each else []),  # reference: the pipeline's input
            *([PluginGuard(self.thresholds)] if self.check_plugins else []),
            PluginErrors(),
            Reproducer(self.pipeline, self.source),
            Statistics(),
            Timing(),
        ]

    def _run_items(self, model: ir.Model, items: tuple[Item, ...], iteration: int | None) -> bool:
        modified = False
        for item in items:
            if isinstance(item, FixedPoint):
                modified |= self._run_fixed_point(model, item)
            else:
                modified |= self._run_pass(model, item, iteration)
        return modified

    def _run_fixed_point(self, model: ir.Model, fp: FixedPoint) -> bool:
        any_change = False
        for i in range(1, fp.max_iterations + 1):
            changed = self._run_items(model, fp.items, iteration=i)
            any_change |= changed
            if not changed:
                return any_change
        self._warnings.append(f"{fp} still changed the model after {fp.max_iterations} iterations; stopped there")
        return any_change

    def _run_pass(self, model: ir.Model, spec: PassSpec, iteration: int | None) -> bool:
        index = len(self._records) + 1
        builtin = registry.is_builtin(spec.name)
        where = f"pass #{index} '{spec.name}'" + ("" if builtin else f" ({registry.origin(spec.name)})")
        instance = _create(spec, where, builtin)
        instance.explain = spec.name in self.explain
        run = PassRun(spec, instance, index, iteration, builtin, where, self._warnings)
        for instrument in self._instruments:
            instrument.before(run, model)
        try:
            result = _execute(instance, model)
        except Exception as exc:
            error = exc
            for instrument in reversed(self._instruments):
                error = instrument.failed(run, model, error) or error
            if error is exc:
                raise
            raise error from None
        run.record = PassRecord(  # seconds, nodes and bytes: filled in by Timing and Statistics
            name=spec.name,
            options=instance.options_dict(),
            seconds=0.0,
            modified=result.modified,
            nodes_before=0,
            nodes_after=0,
            bytes_before=0,
            bytes_after=0,
            counters=dict(sorted(instance.counters.items())),
            iteration=iteration,
            explanations=list(instance.explanations) if instance.explain else None,
        )
        self._records.append(run.record)  # kept even when an `after` hook (guard, verify-each) stops the pipeline
        self._warnings.extend(f"{spec.name}: {w}" for w in instance.warnings)
        for instrument in reversed(self._instruments):
            instrument.after(run, model, result)
        return result.modified


def _create(spec: PassSpec, where: str, builtin: bool) -> Pass:
    """The pass instance for ``spec`` (its options checked); a plugin that cannot be made is named."""
    cls = get_pass(spec.name)
    options = make_options(cls.Options, dict(spec.options), spec.name)
    try:
        return cls(options)
    except Exception as exc:
        if builtin:
            raise
        raise plugin_failure(where, "cannot be created:", exc, cls,
                             "(a pass takes its Options as its one argument)") from None


def _execute(instance: Pass, model: ir.Model) -> ir.passes.PassResult:
    """The pass contract, step by step (what onnx_ir's ``PassBase.__call__`` checks, raising what the
    instruments' ``failed`` hooks report): ``requires``, the pass, an in-place ``PassResult``, ``ensures``."""
    instance.requires(model)
    result = instance.call(model)
    if not isinstance(result, ir.passes.PassResult) or result.model is not model:
        got = "a new model" if isinstance(result, ir.passes.PassResult) else type(result).__name__
        raise TypeError(f"pass '{instance.name}' returned {got}; passes must change the model they are given "
                        "in place and return a PassResult")
    instance.ensures(model)
    return result


def check_explain(pipeline: Pipeline, names: Iterable[str]) -> set[str]:
    """The pass names ``--explain`` asked for, each of which must be in the pipeline."""
    names = set(names)
    unknown = names - {spec.name for spec in pipeline.pass_specs()}
    if unknown:
        raise PipelineError(f"--explain {', '.join(sorted(unknown))}: no such pass in the pipeline '{pipeline}'")
    return names


def run_pipeline(model: ir.Model, pipeline: Pipeline | str, **kwargs: Any) -> PipelineResult:
    """Convenience: parse (if needed) and run a pipeline over a model in place."""
    from llmopt.core.pipeline import parse

    if isinstance(pipeline, str):
        pipeline = parse(pipeline)
    return PassManager(pipeline, **kwargs).run(model)

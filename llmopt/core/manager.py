"""The PassManager: runs a pipeline over an ``onnx_ir.Model`` with instrumentation
(time, node and byte deltas, counters), optional verify-each, fixed-point
iteration and a crash reproducer.

Passes that are not built in (plugins, see ``llmopt.core.plugins``) are guarded: an exception, a
graph the ONNX checker or ONNX Runtime rejects, or logits moved beyond the thresholds relative to
the model the pass was given stop the pipeline with a ``PluginError`` naming the pass."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.core import registry
from llmopt.ort import verify
from llmopt.ort import sessions
from llmopt.errors import LlmoptError, PipelineError, PluginError, VerificationError, first_line
from llmopt.core.pass_base import Pass, make_options
from llmopt.core.pipeline import FixedPoint, Item, PassSpec, Pipeline
from llmopt.core.plugins import plugin_frame
from llmopt.core.registry import get_pass


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


class _Numerics:
    """Sample inputs for the pipeline's input model, and running a model on them (checker first)."""

    def __init__(self, model: ir.Model, thresholds: verify.Thresholds):
        self.thresholds = thresholds
        shapes = verify.default_shapes(verify.has_past_inputs(model))
        self.feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(shapes)]

    def outputs(self, model: ir.Model, where: str, error: type[LlmoptError] = VerificationError) -> list[dict]:
        try:
            with sessions.saved(model) as path:
                try:
                    verify.check_onnx(path)
                except Exception as exc:  # onnx.checker.ValidationError and friends
                    raise error(f"{where} produced an invalid model (ONNX checker: {first_line(exc)})") from None
                try:
                    return sessions.run_path(path, self.feeds)
                except Exception as exc:  # ORT refuses to load or run it
                    raise error(f"{where} produced a model ONNX Runtime cannot run: {first_line(exc)}") from None
        except LlmoptError:
            raise
        except Exception as exc:  # onnx_ir cannot even serialize it
            raise error(f"{where} produced a model that cannot be saved: {type(exc).__name__}: {first_line(exc)}") from None

    def compare(self, reference: list[dict], outputs: list[dict]) -> tuple[dict, list[str]]:
        figs = verify.worst([verify.compare(r, o) for r, o in zip(reference, outputs)])
        return figs.as_dict(), figs.misses(self.thresholds)


class _VerifyEach(_Numerics):
    """After every pass: the ONNX checker, then the logits against the pipeline's input."""

    def __init__(self, model: ir.Model, thresholds: verify.Thresholds):
        super().__init__(model, thresholds)
        self.reference = sessions.run_ir_model(model, self.feeds)

    def check(self, model: ir.Model, record: PassRecord, index: int) -> None:
        where = f"pass #{index} '{record.name}'"
        figures, misses = self.compare(self.reference, self.outputs(model, where))
        record.verify = {"figures": figures, "misses": misses}
        if misses:
            raise VerificationError(
                f"{where} is the first to break numerics against the pipeline input: {'; '.join(misses)}"
            )


class _PluginGuard(_Numerics):
    """Around a plugin (not built-in) pass: the model it returns must pass the ONNX checker, run in
    ONNX Runtime, and give logits within the thresholds of the model it was given."""

    def before(self, model: ir.Model) -> list[dict] | None:
        self.signature = _signature(model)
        try:
            return sessions.run_ir_model(model, self.feeds)
        except Exception:  # e.g. a graph only another provider runs: numerics cannot be compared here
            return None

    def after(self, model: ir.Model, reference: list[dict] | None, where: str, record: PassRecord) -> list[str]:
        (ins, outs), (new_ins, new_outs) = self.signature, _signature(model)
        if new_ins != ins:
            raise PluginError(f"{where} changed the model's inputs ({_diff(ins, new_ins)}); callers feed the "
                              "inputs the model had (use --trust-plugins if this is intended)")
        if outs.keys() - new_outs.keys():
            raise PluginError(f"{where} removed model outputs ({_diff(outs, new_outs)}); callers read them")
        outputs = self.outputs(model, where, error=PluginError)
        if reference is None:
            return [f"{where}: its numerics were not checked (the model it was given does not run on the CPU provider)"]
        try:
            figures, misses = self.compare(reference, outputs)
        except (KeyError, ValueError) as exc:
            raise PluginError(f"{where} changed the model's outputs: {first_line(exc)}") from None
        record.verify = {"figures": figures, "misses": misses, "against": "the model before this pass"}
        if misses:
            raise PluginError(f"{where} changed the logits beyond the thresholds: {'; '.join(misses)}")
        return []


def _signature(model: ir.Model) -> tuple[dict[str, str], dict[str, str]]:
    """Graph inputs and outputs: name → dtype."""
    return tuple({v.name: str(v.dtype) for v in vs} for vs in (model.graph.inputs, model.graph.outputs))


def _diff(old: dict[str, str], new: dict[str, str]) -> str:
    parts = [f"removed {', '.join(sorted(old.keys() - new.keys()))}" if old.keys() - new.keys() else "",
             f"added {', '.join(sorted(new.keys() - old.keys()))}" if new.keys() - old.keys() else "",
             ", ".join(f"{k} {old[k]} -> {new[k]}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k])]
    return "; ".join(p for p in parts if p)


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
    ):
        pipeline.validate()
        self.pipeline = pipeline
        self.verify_each = verify_each
        self.thresholds = thresholds or verify.Thresholds(min_cosine=0.99)
        self.on_start = on_start
        self.on_end = on_end
        self.source = source
        self.explain = check_explain(pipeline, explain)
        self.check_plugins = check_plugins
        self._records: list[PassRecord] = []
        self._warnings: list[str] = []
        self._checker: _VerifyEach | None = None

    def run(self, model: ir.Model) -> PipelineResult:
        self._records, self._warnings = [], []
        self._checker = _VerifyEach(model, self.thresholds) if self.verify_each else None
        modified = self._run_items(model, self.pipeline.items, iteration=None)
        return PipelineResult(model, modified, self._records, self._warnings)

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
        cls = get_pass(spec.name)
        index = len(self._records) + 1
        builtin = registry.is_builtin(spec.name)
        where = f"pass #{index} '{spec.name}'" + ("" if builtin else f" ({registry.origin(spec.name)})")
        options = make_options(cls.Options, dict(spec.options), spec.name)
        try:
            instance: Pass = cls(options)
        except Exception as exc:
            if builtin:
                raise
            raise PluginError(f"{where} cannot be created: {type(exc).__name__}: {first_line(exc)}"
                              f"{plugin_frame(exc, cls)} (a pass takes its Options as its one argument)") from None
        instance.explain = spec.name in self.explain
        if self.on_start:
            self.on_start(index, spec)
        guarded = not builtin and self.check_plugins
        if guarded:  # inputs drawn for the model as this pass gets it (an earlier pass may add a cache)
            guard = _PluginGuard(model, self.thresholds)
            reference = guard.before(model)
        nodes_before, bytes_before = graph_util.node_count(model), graph_util.initializer_bytes(model)
        start = time.perf_counter()
        try:
            result = instance(model)
        except LlmoptError as exc:
            if builtin:
                raise
            raise type(exc)(f"{where}: {exc}") from None  # the plugin's own message, said where
        except Exception as exc:
            path = self._write_reproducer(spec, exc)
            if not builtin:  # the user's code: say which pass and where, no traceback
                raise PluginError(
                    f"{where} raised {type(exc).__name__}: {first_line(exc)}{plugin_frame(exc, cls)} "
                    f"(reproducer: {path})") from None
            exc.add_note(f"llmopt: pass '{spec.name}' crashed; reproducer written to {path}")
            raise
        if result.model is not model:
            if not builtin:
                raise PluginError(f"{where} returned a new model; passes must change the model they are given in place")
            raise TypeError(f"pass '{spec.name}' returned a new model; llmopt passes work in place")
        seconds = time.perf_counter() - start
        record = PassRecord(
            name=spec.name,
            options=instance.options_dict(),
            seconds=seconds,
            modified=result.modified,
            nodes_before=nodes_before,
            nodes_after=graph_util.node_count(model),
            bytes_before=bytes_before,
            bytes_after=graph_util.initializer_bytes(model),
            counters=dict(sorted(instance.counters.items())),
            iteration=iteration,
            explanations=list(instance.explanations) if instance.explain else None,
        )
        self._records.append(record)
        self._warnings.extend(f"{spec.name}: {w}" for w in instance.warnings)
        if guarded:
            self._warnings.extend(guard.after(model, reference, where, record))
        if self._checker is not None:
            self._checker.check(model, record, index)
        if self.on_end:
            self.on_end(index, record)
        return result.modified

    def _write_reproducer(self, spec: PassSpec, exc: BaseException) -> Path:
        fd, name = tempfile.mkstemp(prefix="llmopt-crash-", suffix=".json")
        files = registry.plugin_files()
        plugins = sorted({str(files[s.name]) for s in self.pipeline.pass_specs() if s.name in files})
        source = str(Path(self.source).resolve()) if self.source and Path(self.source).exists() else self.source
        plugin_args = "".join(f" --plugin {p}" for p in plugins)
        info = {
            "pipeline": str(self.pipeline),
            "failed_pass": str(spec),
            "input": source,
            "plugins": plugins,
            "reproduce": f"llmopt compile {source} --passes '{self.pipeline}'{plugin_args} --no-verify -o /tmp/repro"
            if source
            else None,
            "error": "".join(traceback.format_exception_only(type(exc), exc)).strip(),
        }
        with open(fd, "w") as fh:
            json.dump(info, fh, indent=2)
        return Path(name)


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

"""Pass instrumentation in the style of MLIR's ``PassInstrumentation``: the PassManager runs every
pass between the hooks of a list of instruments, one per concern.

For instruments ``[a, b, c]``: ``a.before``, ``b.before``, ``c.before``, then the pass (its
``requires``, ``run`` and ``ensures``), then ``c.after``, ``b.after``, ``a.after``; or, when the pass
raised, ``c.failed``, ``b.failed``, ``a.failed``, each of which may hand back an exception to raise
instead. The innermost instrument is the closest to the pass, the outermost sees the final outcome.
The manager's list, outermost first (``PassManager._instruments``):

================  ==========================================================================
``Progress``      the ``on_start``/``on_end`` callbacks (the CLI's progress lines)
``VerifyEach``    ``verify_each=True``: ONNX checker, then logits against the pipeline's input
``PluginGuard``   ``check_plugins=True``: a plugin's model must pass the checker, run in ORT,
                  keep its inputs and outputs, and keep the logits of the model it was given
``PluginErrors``  a plugin that raises is named in one line (``PluginError``), without traceback
``Reproducer``    a crash (not an ``LlmoptError``) writes a JSON file that reruns the failure
``Statistics``    node count and initializer bytes before and after
``Timing``        the pass's wall time
================  ==========================================================================

An ``after`` hook may raise to stop the pipeline (the guard, verify-each); that is not the pass
failing, so no ``failed`` hook runs, but the pass's record has been kept.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import onnx_ir as ir

from llmopt.core import graph_util, registry
from llmopt.core.pass_base import Pass
from llmopt.core.pipeline import PassSpec, Pipeline
from llmopt.core.plugins import plugin_frame
from llmopt.errors import LlmoptError, PluginError, VerificationError, first_line
from llmopt.ort import sessions, verify

if TYPE_CHECKING:
    from llmopt.core.manager import PassRecord


@dataclasses.dataclass
class PassRun:
    """One run of one pass, as instruments see it (the ``pass_`` of every hook)."""

    spec: PassSpec
    instance: Pass
    index: int  # 1-based, in the order passes ran (a fixed point's passes count once per iteration)
    iteration: int | None  # the fixed point's iteration, if inside one
    builtin: bool
    where: str  # how errors name it: "pass #3 'name'", plus " (origin)" for a plugin
    warnings: list[str]  # the pipeline's warnings: an instrument may add to them
    record: PassRecord | None = None  # set when the pass returned, before any `after` hook
    reproducer: Path | None = None  # set by `Reproducer` when the pass crashed

    @property
    def name(self) -> str:
        return self.spec.name


class PassInstrument:
    """Hooks around every pass run; subclasses override the ones they need."""

    def before(self, pass_: PassRun, model: ir.Model) -> None:
        """Before the pass (and its ``requires``) runs on ``model``."""

    def after(self, pass_: PassRun, model: ir.Model, result: ir.passes.PassResult) -> None:
        """The pass succeeded; ``pass_.record`` is set. Raise to stop the pipeline."""

    def failed(self, pass_: PassRun, model: ir.Model, exc: Exception) -> Exception | None:
        """The pass raised ``exc`` (already replaced by inner instruments, if they did).
        Return an exception to raise instead (without traceback), or None to keep ``exc``."""
        return None


class Timing(PassInstrument):
    """``record.seconds``: wall time of the pass itself (innermost: no other instrument's time)."""

    def before(self, pass_, model):
        self._start = time.perf_counter()

    def after(self, pass_, model, result):
        pass_.record.seconds = time.perf_counter() - self._start


class Statistics(PassInstrument):
    """``record.nodes_before/after`` and ``record.bytes_before/after`` (initializer bytes)."""

    def before(self, pass_, model):
        self._before = graph_util.node_count(model), graph_util.initializer_bytes(model)

    def after(self, pass_, model, result):
        record = pass_.record
        record.nodes_before, record.bytes_before = self._before
        record.nodes_after, record.bytes_after = graph_util.node_count(model), graph_util.initializer_bytes(model)


class Progress(PassInstrument):
    """``on_start(index, spec)`` before a pass, ``on_end(index, record)`` after one that succeeded."""

    def __init__(self, on_start: Callable[[int, PassSpec], None] | None = None,
                 on_end: Callable[[int, PassRecord], None] | None = None):
        self.on_start, self.on_end = on_start, on_end

    def before(self, pass_, model):
        if self.on_start:
            self.on_start(pass_.index, pass_.spec)

    def after(self, pass_, model, result):
        if self.on_end:
            self.on_end(pass_.index, pass_.record)


class Reproducer(PassInstrument):
    """A pass that crashed (any exception but an ``LlmoptError``) writes ``llmopt-crash-*.json`` to the
    temp folder: the pipeline, the failed pass, the input, the plugin files and a command that reruns
    it. Its path goes to ``pass_.reproducer`` and, as a note, onto the exception."""

    def __init__(self, pipeline: Pipeline, source: str | None):
        self.pipeline, self.source = pipeline, source

    def failed(self, pass_, model, exc):
        if isinstance(exc, LlmoptError):  # a refusal that says what to do, not a crash
            return None
        pass_.reproducer = self.write(pass_.spec, exc)
        exc.add_note(f"llmopt: pass '{pass_.name}' crashed; reproducer written to {pass_.reproducer}")
        return None

    def write(self, spec: PassSpec, exc: BaseException) -> Path:
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


def plugin_failure(where: str, what: str, exc: BaseException, cls: type, tail: str) -> PluginError:
    """``{where} {what} Type: message at file.py:N {tail}``: a plugin's exception in one line."""
    return PluginError(f"{where} {what} {type(exc).__name__}: {first_line(exc)}{plugin_frame(exc, cls)} {tail}")


class PluginErrors(PassInstrument):
    """A plugin (not built-in) pass that fails stops the pipeline with one line naming it and its origin:
    its own ``LlmoptError`` prefixed with where it ran, any other exception as a ``PluginError`` with
    the line in the plugin's file and the reproducer. A built-in's exception is kept as it is (a crash
    there is llmopt's bug and keeps its traceback)."""

    def failed(self, pass_, model, exc):
        if pass_.builtin:
            return None
        if isinstance(exc, LlmoptError):
            return type(exc)(f"{pass_.where}: {exc}")  # the plugin's own message, said where
        return plugin_failure(pass_.where, "raised", exc, type(pass_.instance), f"(reproducer: {pass_.reproducer})")


class _Numerics:
    """Sample inputs for a model, and running a model on them (checker first)."""

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


class VerifyEach(PassInstrument):
    """After every pass: the ONNX checker, then the logits against the pipeline's input (``record.verify``);
    the first pass to miss the thresholds stops the pipeline with a ``VerificationError`` naming it."""

    def __init__(self, model: ir.Model, thresholds: verify.Thresholds):
        self.numerics = _Numerics(model, thresholds)
        self.reference = sessions.run_ir_model(model, self.numerics.feeds)

    def after(self, pass_, model, result):
        where = f"pass #{pass_.index} '{pass_.name}'"
        figures, misses = self.numerics.compare(self.reference, self.numerics.outputs(model, where))
        pass_.record.verify = {"figures": figures, "misses": misses}
        if misses:
            raise VerificationError(
                f"{where} is the first to break numerics against the pipeline input: {'; '.join(misses)}"
            )


class PluginGuard(PassInstrument):
    """Around a plugin (not built-in) pass: the model it returns must keep its inputs and outputs, pass
    the ONNX checker, run in ONNX Runtime, and give logits within the thresholds of the model it was
    given (``record.verify``, "against": the model before this pass). Otherwise a ``PluginError``.
    Inputs are drawn for the model as the pass gets it (an earlier pass may have added a cache)."""

    def __init__(self, thresholds: verify.Thresholds):
        self.thresholds = thresholds

    def before(self, pass_, model):
        if pass_.builtin:
            return
        self._numerics = _Numerics(model, self.thresholds)
        self._signature = _signature(model)
        try:
            self._reference = sessions.run_ir_model(model, self._numerics.feeds)
        except Exception:  # e.g. a graph only another provider runs: numerics cannot be compared here
            self._reference = None

    def after(self, pass_, model, result):
        if pass_.builtin:
            return
        where, record, reference = pass_.where, pass_.record, self._reference
        (ins, outs), (new_ins, new_outs) = self._signature, _signature(model)
        if new_ins != ins:
            raise PluginError(f"{where} changed the model's inputs ({_diff(ins, new_ins)}); callers feed the "
                              "inputs the model had (use --trust-plugins if this is intended)")
        if outs.keys() - new_outs.keys():
            raise PluginError(f"{where} removed model outputs ({_diff(outs, new_outs)}); callers read them")
        outputs = self._numerics.outputs(model, where, error=PluginError)
        if reference is None:
            pass_.warnings.append(
                f"{where}: its numerics were not checked (the model it was given does not run on the CPU provider)")
            return
        try:
            figures, misses = self._numerics.compare(reference, outputs)
        except (KeyError, ValueError) as exc:
            raise PluginError(f"{where} changed the model's outputs: {first_line(exc)}") from None
        record.verify = {"figures": figures, "misses": misses, "against": "the model before this pass"}
        if misses:
            raise PluginError(f"{where} changed the logits beyond the thresholds: {'; '.join(misses)}")


def _signature(model: ir.Model) -> tuple[dict[str, str], dict[str, str]]:
    """Graph inputs and outputs: name → dtype."""
    return tuple({v.name: str(v.dtype) for v in vs} for vs in (model.graph.inputs, model.graph.outputs))


def _diff(old: dict[str, str], new: dict[str, str]) -> str:
    parts = [f"removed {', '.join(sorted(old.keys() - new.keys()))}" if old.keys() - new.keys() else "",
             f"added {', '.join(sorted(new.keys() - old.keys()))}" if new.keys() - old.keys() else "",
             ", ".join(f"{k} {old[k]} -> {new[k]}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k])]
    return "; ".join(p for p in parts if p)

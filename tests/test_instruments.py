"""PassManager instruments (llmopt.core.instruments): each one's before/after/failed behaviour on a
tiny model run in ONNX Runtime, the order they run in, and passes' requires()/ensures()."""

import json
import time
from pathlib import Path

import onnx_ir as ir
import pytest

import llmopt
from llmopt.core import graph_util, instruments
from llmopt.core.instruments import (
    PassInstrument,
    PassRun,
    PluginErrors,
    PluginGuard,
    Reproducer,
    VerifyEach,
)
from llmopt.core.manager import PassManager, PassRecord, run_pipeline
from llmopt.core.pass_base import Pass, PreconditionError
from llmopt.core.pipeline import PassSpec, parse
from llmopt.core.registry import BUILTIN, get_pass, register_pass
from llmopt.errors import PipelineError, PluginError, VerificationError
from llmopt.ort import verify
from llmopt.passes.kv_cache import KVCacheError

THRESHOLDS = verify.Thresholds(min_cosine=0.99)


class Recorder(PassInstrument):
    """An extra instrument (outermost): what it saw, in order."""

    def __init__(self):
        self.events = []

    def before(self, pass_, model):
        self.events.append(("before", pass_.name, pass_.index))

    def after(self, pass_, model, result):
        rec = pass_.record
        self.events.append(("after", pass_.name, rec.seconds > 0, rec.nodes_before > 0, result.modified))

    def failed(self, pass_, model, exc):
        self.failure = (pass_, exc)
        self.events.append(("failed", pass_.name, type(exc).__name__))


@register_pass(origin=BUILTIN)
class _Sleep(Pass):
    name = "ti-sleep"
    summary = "test pass: sleeps 0.2 s, changes nothing"

    def run(self, model):
        time.sleep(0.2)
        return False


@register_pass(origin=BUILTIN)
class _AddIdentity(Pass):
    name = "ti-add-identity"
    summary = "test pass: one Identity on the first output"

    def run(self, model):
        out = model.graph.outputs[0]
        ident = ir.node("Identity", [out])
        model.graph.append(ident)
        ident.outputs[0].name, out.name = out.name, f"{out.name}_pre"
        ident.outputs[0].shape, ident.outputs[0].type = out.shape, out.type
        model.graph.outputs[0] = ident.outputs[0]
        return True


@register_pass(origin=BUILTIN)
class _BuiltinCrash(Pass):
    name = "ti-crash"
    summary = "test pass"

    def run(self, model):
        raise RuntimeError("boom")


@register_pass
class _PluginCrash(Pass):  # a plugin: this module is not llmopt
    name = "ti-explode"
    summary = "test pass"

    def run(self, model):
        return 1 // 0


@register_pass
class _NeedsGQA(Pass):
    name = "ti-needs-gqa"
    summary = "test pass: counts GroupQueryAttention, after fuse"
    ran = 0

    def requires(self, model):
        if not any(n.op_type == "GroupQueryAttention" for n in model.graph):
            raise PreconditionError("ti-needs-gqa needs attention fused: run `fuse` before `ti-needs-gqa`")

    def run(self, model):
        type(self).ran += 1
        self.count("gqa", sum(n.op_type == "GroupQueryAttention" for n in model.graph))
        return False


@register_pass
class _BrokenPromise(Pass):
    name = "ti-broken-promise"
    summary = "test pass: its ensures() fails"

    def run(self, model):
        return False

    def ensures(self, model):
        assert "ti.stamp" in model.metadata_props, "the stamp is missing"


@register_pass(origin=BUILTIN)
class _NewModel(Pass):
    name = "ti-new-model"
    summary = "test pass: returns a copy (against the contract)"

    def call(self, model):
        return ir.passes.PassResult(model.clone(), False)


def _run(model, spec: str, index: int = 1, builtin: bool = False) -> PassRun:
    """A PassRun for hooks called directly (the manager makes these)."""
    instance = get_pass(spec)()
    where = f"pass #{index} '{spec}'" + ("" if builtin else " (test)")
    return PassRun(PassSpec(spec), instance, index, None, builtin, where, [])


def _record(name: str) -> PassRecord:
    return PassRecord(name, {}, 0.0, True, 0, 0, 0, 0, {})


# ---------------------------------------------------------------------------------- order


def test_hooks_wrap_every_pass_outermost_first(llama_onnx):
    rec, progress = Recorder(), []
    manager = PassManager(parse("fold,ti-add-identity"), instruments=[rec],
                          on_start=lambda i, spec: progress.append(("start", i, str(spec))),
                          on_end=lambda i, r: progress.append(("end", i, r.name, r.nodes_after)))
    result = manager.run(llmopt.load(llama_onnx))
    # the extra instrument is outside the built-in ones: its `after` sees what Timing and Statistics filled in
    assert rec.events == [("before", "fold", 1), ("after", "fold", True, True, result.records[0].modified),
                          ("before", "ti-add-identity", 2), ("after", "ti-add-identity", True, True, True)]
    assert progress == [("start", 1, "fold"), ("end", 1, "fold", result.records[0].nodes_after),
                        ("start", 2, "ti-add-identity"), ("end", 2, "ti-add-identity", result.records[1].nodes_after)]


# ---------------------------------------------------------------------------------- timing, statistics


def test_timing_measures_the_pass(llama_onnx):
    result = run_pipeline(llmopt.load(llama_onnx), "ti-sleep,fold")
    assert 0.2 <= result.records[0].seconds < 5
    assert result.records[0].modified is False


def test_statistics_count_nodes_and_bytes_before_and_after(llama_onnx):
    model = llmopt.load(llama_onnx)
    nodes, size = graph_util.node_count(model), graph_util.initializer_bytes(model)
    result = run_pipeline(model, "ti-add-identity,quantize-dynamic")
    ident, quant = result.records
    assert (ident.nodes_before, ident.nodes_after) == (nodes, nodes + 1)
    assert ident.bytes_before == ident.bytes_after == size
    assert quant.nodes_before == nodes + 1 and quant.bytes_before == size and quant.bytes_after < size / 2
    assert quant.nodes_after == graph_util.node_count(model) and quant.bytes_after == graph_util.initializer_bytes(model)


# ---------------------------------------------------------------------------------- verify-each


def test_verify_each_compares_with_the_pipeline_input(llama_onnx):
    model = llmopt.load(llama_onnx)
    check = VerifyEach(model, THRESHOLDS)  # runs the pipeline's input once, in ORT
    run = _run(model, "ti-add-identity", index=4, builtin=True)
    run.record = _record("ti-add-identity")
    check.after(run, model, None)  # unchanged numerics
    assert run.record.verify["figures"]["max_abs"] == 0.0 and run.record.verify["misses"] == []
    for v in model.graph.initializers.values():  # break the logits
        if v.dtype == ir.DataType.FLOAT and v.const_value is not None and v.const_value.size > 100:
            v.const_value = ir.tensor(v.const_value.numpy() * 3.0, name=v.name)
    with pytest.raises(VerificationError, match="pass #4 'ti-add-identity' is the first to break numerics"):
        check.after(run, model, None)
    assert run.record.verify["misses"]  # the figures are kept on the record that failed


# ---------------------------------------------------------------------------------- plugin guard


def test_plugin_guard_checks_plugins_against_the_model_they_were_given(llama_onnx):
    model = llmopt.load(llama_onnx)
    guard = PluginGuard(THRESHOLDS)
    builtin = _run(model, "fold", builtin=True)
    builtin.record = _record("fold")
    guard.before(builtin, model)
    guard.after(builtin, model, None)
    assert builtin.record.verify is None  # built-in passes are not guarded

    plugin = _run(model, "ti-explode")
    plugin.record = _record("ti-explode")
    guard.before(plugin, model)  # the reference: this model, in ORT
    guard.after(plugin, model, None)
    assert plugin.record.verify["against"] == "the model before this pass"
    assert plugin.record.verify["figures"]["max_abs"] == 0.0 and plugin.warnings == []

    guard.before(plugin, model)
    model.graph.inputs[0].dtype = ir.DataType.INT32
    with pytest.raises(PluginError, match=r"pass #1 'ti-explode' \(test\) changed the model's inputs \(input_ids INT64 -> INT32\)"):
        guard.after(plugin, model, None)


def test_plugin_guard_warns_when_the_model_it_was_given_does_not_run(llama_onnx, monkeypatch):
    model = llmopt.load(llama_onnx)
    guard, plugin = PluginGuard(THRESHOLDS), _run(model, "ti-explode")
    plugin.record = _record("ti-explode")
    with monkeypatch.context() as m:
        m.setattr(instruments.sessions, "run_ir_model", lambda *a: 1 / 0)  # as if only another provider ran it
        guard.before(plugin, model)
    guard.after(plugin, model, None)  # the result runs: checked, but not compared
    assert plugin.record.verify is None
    assert plugin.warnings == ["pass #1 'ti-explode' (test): its numerics were not checked (the model it was "
                               "given does not run on the CPU provider)"]


def test_a_guard_failure_keeps_the_record_and_is_not_a_pass_failure(llama_onnx, tmp_path):
    path = tmp_path / "ti_triple.py"
    path.write_text("import onnx_ir as ir\nfrom llmopt import Pass\n\nclass Triple(Pass):\n"
                    "    name = 'ti-triple'\n    summary = 'x3'\n\n    def run(self, model):\n"
                    "        for v in model.graph.initializers.values():\n"
                    "            if v.dtype == ir.DataType.FLOAT and v.const_value is not None and v.const_value.size > 100:\n"
                    "                v.const_value = ir.tensor(v.const_value.numpy() * 3.0, name=v.name)\n"
                    "        return True\n")
    llmopt.load_plugin(path)
    rec = Recorder()
    manager = PassManager(parse("fold,ti-triple"), instruments=[rec])
    with pytest.raises(PluginError, match=r"pass #2 'ti-triple' \(plugin file .*\) changed the logits beyond"):
        manager.run(llmopt.load(llama_onnx))
    assert [e[0] for e in rec.events] == ["before", "after", "before"]  # no `failed`, no `after`
    assert [r.name for r in manager._records] == ["fold", "ti-triple"]
    assert manager._records[1].verify["misses"]


# ---------------------------------------------------------------------------------- failures: errors, reproducer


def test_reproducer_is_written_for_a_crash_only(llama_onnx):
    pipeline = parse("fold,ti-crash")
    repro = Reproducer(pipeline, str(llama_onnx))
    run = _run(None, "ti-crash", index=2, builtin=True)
    refusal = PipelineError("a refusal")
    assert repro.failed(run, None, refusal) is None and run.reproducer is None and not hasattr(refusal, "__notes__")
    crash = RuntimeError("boom")
    assert repro.failed(run, None, crash) is None
    info = json.loads(run.reproducer.read_text())
    assert info["pipeline"] == "fold,ti-crash" and info["failed_pass"] == "ti-crash"
    assert info["input"] == str(Path(llama_onnx).resolve()) and info["error"] == "RuntimeError: boom"
    assert crash.__notes__ == [f"llmopt: pass 'ti-crash' crashed; reproducer written to {run.reproducer}"]


def test_plugin_errors_name_a_failing_plugin():
    errors = PluginErrors()
    assert errors.failed(_run(None, "ti-crash", builtin=True), None, RuntimeError("boom")) is None
    plugin = _run(None, "ti-explode", index=3)
    own = errors.failed(plugin, None, VerificationError("its own message"))
    assert type(own) is VerificationError and str(own) == "pass #3 'ti-explode' (test): its own message"
    plugin.reproducer = Path("/tmp/r.json")
    crash = errors.failed(plugin, None, ZeroDivisionError("division by zero"))
    assert isinstance(crash, PluginError)
    assert str(crash) == "pass #3 'ti-explode' (test) raised ZeroDivisionError: division by zero (reproducer: /tmp/r.json)"


def test_failed_hooks_see_a_builtin_crash_unchanged(llama_onnx):
    rec, ends = Recorder(), []
    manager = PassManager(parse("fold,ti-crash"), instruments=[rec], on_end=lambda i, r: ends.append(i))
    with pytest.raises(RuntimeError, match="boom") as info:
        manager.run(llmopt.load(llama_onnx))
    run, exc = rec.failure
    assert exc is info.value and run.reproducer.is_file()  # the reproducer ran before the outer hooks
    assert info.value.__notes__ == [f"llmopt: pass 'ti-crash' crashed; reproducer written to {run.reproducer}"]
    assert rec.events[-1] == ("failed", "ti-crash", "RuntimeError") and ends == [1]  # no on_end for the crash
    assert [r.name for r in manager._records] == ["fold"]


def test_failed_hooks_see_a_plugin_crash_as_one_line(llama_onnx):
    rec = Recorder()
    with pytest.raises(PluginError) as info:
        PassManager(parse("fold,ti-explode"), instruments=[rec]).run(llmopt.load(llama_onnx))
    message = str(info.value)
    assert message.startswith(f"pass #2 'ti-explode' (python module {__name__}) raised ZeroDivisionError: "
                              "integer division or modulo by zero at test_instruments.py:")
    run, exc = rec.failure
    assert exc is info.value and message.endswith(f"(reproducer: {run.reproducer})") and run.reproducer.is_file()
    assert info.value.__suppress_context__  # no traceback of the plugin's code


# ---------------------------------------------------------------------------------- requires / ensures


def test_kv_cache_requires_fused_attention_when_the_cache_is_required(exported):
    model = llmopt.load(exported("llama", False))
    before = graph_util.io_signature(model), graph_util.node_count(model)
    rec = Recorder()
    with pytest.raises(KVCacheError, match="put 'fuse' before 'kv-cache'") as info:
        PassManager(parse("kv-cache{require=true}"), instruments=[rec]).run(model)
    assert isinstance(info.value, PipelineError) and isinstance(info.value, ir.passes.PreconditionError)
    assert str(info.value).startswith("kv-cache: this graph has no KV cache and 2 of its attention blocks are not "
                                      "fused to GroupQueryAttention (0 are)")  # one line, as the pass wrote it
    assert rec.failure[0].reproducer is None  # a refusal, not a crash
    assert (graph_util.io_signature(model), graph_util.node_count(model)) == before
    with pytest.raises(PreconditionError, match="put 'fuse' before 'kv-cache'"):  # onnx_ir's __call__ checks it too
        get_pass("kv-cache")(require=True)(model)
    # require=false (the targets' pipelines): not refused; the graph is left without a cache, with a warning
    result = run_pipeline(model, "kv-cache")
    assert result.records[0].counters == {"left_without_cache": 1} and "no KV cache" in result.warnings[0]


def test_kv_cache_shared_buffer_is_refused_before_the_graph_is_touched(exported):
    model = llmopt.load(exported("llama", True))  # a cache, attention not fused
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values."):
            _, layer, kind = v.name.split(".")
            v.name = f"past_{kind}.{layer}"
    names = [v.name for v in model.graph.inputs]
    with pytest.raises(KVCacheError, match=r"buffer=shared\} needs GroupQueryAttention"):
        run_pipeline(model, "kv-cache{buffer=shared}")
    assert [v.name for v in model.graph.inputs] == names  # not canonicalized first
    assert run_pipeline(model, "kv-cache").records[0].counters["renamed_inputs"] == 4  # concat: fine


def test_a_plugin_requires_names_what_to_run_first(llama_onnx):
    _NeedsGQA.ran = 0
    with pytest.raises(PipelineError) as info:
        run_pipeline(llmopt.load(llama_onnx), "fold,ti-needs-gqa")
    assert str(info.value) == (f"pass #2 'ti-needs-gqa' (python module {__name__}): ti-needs-gqa needs "
                               "attention fused: run `fuse` before `ti-needs-gqa`")
    assert type(info.value) is PreconditionError and _NeedsGQA.ran == 0
    result = run_pipeline(llmopt.load(llama_onnx), "fold,cleanup,fuse,ti-needs-gqa")
    assert result.records[-1].counters == {"gqa": 2} and _NeedsGQA.ran == 1


def test_ensures_failing_is_the_pass_failing(llama_onnx):
    with pytest.raises(PluginError, match=r"pass #1 'ti-broken-promise' .* raised AssertionError: the stamp is missing "
                                          r"at test_instruments.py:\d+ \(reproducer: "):
        run_pipeline(llmopt.load(llama_onnx), "ti-broken-promise")
    model = llmopt.load(llama_onnx)
    model.metadata_props["ti.stamp"] = "1"
    assert run_pipeline(model, "ti-broken-promise").records[0].modified is False


def test_a_pass_must_change_the_model_it_was_given(llama_onnx):
    with pytest.raises(TypeError, match="pass 'ti-new-model' returned a new model; passes must change the model") as info:
        run_pipeline(llmopt.load(llama_onnx), "ti-new-model")
    assert "reproducer written to" in info.value.__notes__[0]

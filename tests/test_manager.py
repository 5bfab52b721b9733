"""PassManager: instrumentation, fixed point, verify-each, crash reproducer."""

import dataclasses
import json

import numpy as np
import onnx_ir as ir
import pytest

import llmopt
from llmopt.errors import VerificationError
from llmopt.core.manager import PassManager, run_pipeline
from llmopt.core.pass_base import Pass, option
from llmopt.core.pipeline import parse
from llmopt.core.registry import BUILTIN, register_pass


@dataclasses.dataclass(frozen=True)
class _CountdownOptions:
    times: int = option(3, "how many runs change the model")


@register_pass
class _Countdown(Pass):
    """Adds an Identity node on each of its first `times` runs on a model (test only)."""

    name = "test-countdown"
    summary = "test pass"
    Options = _CountdownOptions

    def run(self, model):
        done = int(model.metadata_props.get("countdown", "0"))
        if done >= self.options.times:
            return False
        model.metadata_props["countdown"] = str(done + 1)
        out = model.graph.outputs[0]
        ident = ir.node("Identity", [out])
        model.graph.append(ident)
        ident.outputs[0].name = out.name
        out.name = f"{out.name}_pre{done}"
        model.graph.outputs[0] = ident.outputs[0]
        ident.outputs[0].shape, ident.outputs[0].type = out.shape, out.type
        self.count("identities")
        return True


@register_pass
class _ScaleLogits(Pass):
    """Multiplies every float weight by 3: breaks numerics on purpose (test only)."""

    name = "test-break"
    summary = "test pass"

    def run(self, model):
        for v in model.graph.initializers.values():
            if v.dtype == ir.DataType.FLOAT and v.const_value is not None and v.const_value.size > 100:
                v.const_value = ir.tensor(v.const_value.numpy() * 3.0, name=v.name)
        return True


@register_pass(origin=BUILTIN)  # as if built in: a built-in crash is a bug and keeps its traceback
class _Crash(Pass):
    name = "test-crash"
    summary = "test pass"

    def run(self, model):
        raise RuntimeError("boom")


def test_records_instrumentation(llama_onnx):
    model = llmopt.load(llama_onnx)
    result = run_pipeline(model, "fold,cleanup,quantize-dynamic")
    names = [r.name for r in result.records]
    assert names == ["fold", "cleanup", "quantize-dynamic"]
    q = result.records[2]
    assert q.modified and q.counters["matmul"] > 0
    assert q.bytes_after < q.bytes_before / 2
    assert all(r.seconds >= 0 and r.nodes_before > 0 for r in result.records)


def test_fixed_point_iterates_until_no_change(llama_onnx):
    model = llmopt.load(llama_onnx)
    result = run_pipeline(model, "fixpoint(test-countdown{times=3},cleanup)")
    its = [(r.name, r.iteration, r.modified) for r in result.records if r.name == "test-countdown"]
    assert its == [("test-countdown", 1, True), ("test-countdown", 2, True), ("test-countdown", 3, True), ("test-countdown", 4, False)]
    assert not result.warnings


def test_fixed_point_stops_at_max_iterations(llama_onnx):
    model = llmopt.load(llama_onnx)
    result = run_pipeline(model, "fixpoint{max_iterations=2}(test-countdown{times=5})")
    assert len(result.records) == 2
    assert "after 2 iterations" in result.warnings[0]


def test_verify_each_names_first_breaking_pass(llama_onnx):
    model = llmopt.load(llama_onnx)
    with pytest.raises(VerificationError, match="pass #3 'test-break' is the first to break numerics"):
        # check_plugins=False: these test passes are plugins, whose own guard would stop it first (test_plugins.py)
        run_pipeline(model, "fold,cleanup,test-break,quantize-dynamic", verify_each=True, check_plugins=False)


def test_verify_each_records_figures(llama_onnx):
    model = llmopt.load(llama_onnx)
    result = run_pipeline(model, "fold,cleanup,quantize-dynamic", verify_each=True)
    assert result.records[0].verify["figures"]["max_abs"] == 0.0
    q = result.records[2].verify["figures"]
    assert 0 < q["max_abs"] < 0.1 and q["cosine"] > 0.999


def test_crash_writes_reproducer(llama_onnx):
    model = llmopt.load(llama_onnx)
    with pytest.raises(RuntimeError, match="boom") as info:
        PassManager(parse("fold,test-crash"), source=str(llama_onnx)).run(model)
    note = info.value.__notes__[0]
    path = note.rsplit(" ", 1)[-1]
    repro = json.loads(open(path).read())
    assert repro["pipeline"] == "fold,test-crash" and repro["failed_pass"] == "test-crash"
    assert repro["input"] == str(llama_onnx)

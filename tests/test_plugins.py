"""Users' passes: --plugin files, pattern-rule passes, the example package installed with pip,
and plugins that fail being reported by name (exit 1, nothing written)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import llmopt
from llmopt.errors import InputError, PluginError
from llmopt.core.manager import run_pipeline
from llmopt.core.registry import _ORIGINS, _PASSES, origin
from llmopt.core.rules import RewriteRulePass, Rule, fail

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "plugin"


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmopt", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def assert_one_line_error(res, code, *needles):
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), res.stderr[-3000:]
    for n in needles:
        assert n in last, last


def write_plugin(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
    from llmopt import Pass

    class CountNodes(Pass):
        name = "count-nodes"
        summary = "counts nodes, changes nothing"

        def run(self, model):
            self.count("nodes", sum(1 for _ in model.graph))
            return False
"""

RAISES = """
    from llmopt import Pass

    class Explode(Pass):
        name = "explode"
        summary = "raises"

        def run(self, model):
            nodes = list(model.graph)
            return nodes[10_000].name  # IndexError, line 10
"""

BREAKS_GRAPH = """
    from llmopt import Pass

    class DropSoftmax(Pass):
        name = "drop-softmax"
        summary = "removes a node whose output is still used"

        def run(self, model):
            node = next(n for n in model.graph if n.op_type == "Softmax")
            model.graph.remove(node, safe=False)
            return True
"""

BREAKS_NUMERICS = """
    import onnx_ir as ir
    from llmopt import Pass

    class Triple(Pass):
        name = "triple-weights"
        summary = "multiplies every large float weight by 3"

        def run(self, model):
            for v in model.graph.initializers.values():
                if v.dtype == ir.DataType.FLOAT and v.const_value is not None and v.const_value.size > 100:
                    v.const_value = ir.tensor(v.const_value.numpy() * 3.0, name=v.name)
            return True
"""


def test_plugin_file_lists_and_runs(tmp_path, llama_onnx):
    plugin = write_plugin(tmp_path, "good", GOOD)
    res = cli("passes", "--plugin", plugin)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("count-nodes"))
    assert f"[plugin file {plugin}]" in line
    out = tmp_path / "art"
    res = cli("compile", llama_onnx, "--target", "cpu-fp32", "-o", out, "--no-speed", "--plugin", plugin,
              "--passes", "fold,cleanup,count-nodes,fuse,kv-cache,cleanup")
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "llmopt.json").read_text())
    rec = next(p for p in manifest["passes"] if p["name"] == "count-nodes")
    assert rec["counters"]["nodes"] == rec["nodes_before"] > 100 and rec["modified"] is False
    assert rec["verify"]["misses"] == [] and rec["verify"]["figures"]["max_abs"] == 0.0  # the guard ran


@pytest.mark.parametrize("body, needles", [
    (RAISES, ["pass #3 'explode' (plugin file", "raised IndexError", "at bad.py:10", "reproducer"]),
    (BREAKS_GRAPH, ["pass #3 'drop-softmax' (plugin file", "produced an invalid model"]),
    (BREAKS_NUMERICS, ["pass #3 'triple-weights' (plugin file", "changed the logits beyond the thresholds", "cosine"]),
], ids=["raises", "broken-graph", "numerics"])
def test_failing_plugin_is_named_and_nothing_is_written(tmp_path, llama_onnx, body, needles):
    plugin = write_plugin(tmp_path, "bad", body)
    name = needles[0].split("'")[1]
    out = tmp_path / "art"
    report = tmp_path / "report.json"
    res = cli("compile", llama_onnx, "--target", "cpu-fp32", "-o", out, "--no-speed", "--plugin", plugin,
              "--passes", f"fold,cleanup,{name},fuse,cleanup", "--report", report)
    assert_one_line_error(res, 1, *needles)
    assert not out.exists()
    assert not list(tmp_path.glob(".art*")), "staging directory left behind"


def test_trust_plugins_skips_the_guard(llama_onnx):
    """With the guard off, the numeric plugin is only caught by the final verification (not by name)."""
    path = write_plugin(Path(llama_onnx).parent, "trusted_triple", BREAKS_NUMERICS.replace("triple-weights", "trusted-triple"))
    llmopt.load_plugin(path)
    model = llmopt.load(llama_onnx)
    result = run_pipeline(model, "fold,trusted-triple", check_plugins=False)
    assert result.records[1].modified and result.records[1].verify is None
    with pytest.raises(PluginError, match="'trusted-triple'.*changed the logits"):
        run_pipeline(llmopt.load(llama_onnx), "fold,trusted-triple")


def test_plugin_file_errors(tmp_path):
    res = cli("passes", "--plugin", tmp_path / "missing.py")
    assert_one_line_error(res, 2, "missing.py: no such file")
    bad = write_plugin(tmp_path, "syntax", "def broken(:\n    pass\n")
    res = cli("passes", "--plugin", bad)
    assert_one_line_error(res, 1, "plugin file", "syntax.py failed to import: line 1: SyntaxError")
    empty = write_plugin(tmp_path, "empty", "X = 1\n")
    res = cli("passes", "--plugin", empty)
    assert_one_line_error(res, 1, "defines no llmopt pass")
    clash = write_plugin(tmp_path, "clash", GOOD.replace('"count-nodes"', '"fuse"'))
    res = cli("passes", "--plugin", clash)
    assert_one_line_error(res, 1, "pass name 'fuse' is taken", "built-in")
    with pytest.raises(InputError, match="not a .py file"):
        llmopt.load_plugin(tmp_path)  # a directory


class _Reciprocal(Rule):
    """Reciprocal(Sqrt(x)) -> Pow(x, -0.5) (test rule)."""

    def pattern(self, op, x):
        return op.Reciprocal(op.Sqrt(x))

    def rewrite(self, op, x):
        return op.Pow(x, op.Constant(value_float=-0.5))


class _NeverFires(Rule):
    def pattern(self, op, x, k):
        return op.TopK(x, k)

    def check(self, context, x, k, **_):
        return fail("never")

    def rewrite(self, op, x, k):
        return op.Identity(x)


class _RulePass(RewriteRulePass):
    name = "test-rsqrt"
    summary = "test rule pass"
    rules = (_Reciprocal, _NeverFires)


def test_rule_pass_counts_rewrites_and_keeps_numerics(llama_onnx):
    llmopt.register_pass(_RulePass)
    try:
        assert origin("test-rsqrt") == f"python module {__name__}"
        model = llmopt.load(llama_onnx)
        sqrt_before = sum(n.op_type == "Sqrt" for n in model.graph)
        result = run_pipeline(model, "test-rsqrt", explain=["test-rsqrt"])
        rec = result.records[0]
        assert rec.counters == {"_Reciprocal": sqrt_before} and sqrt_before == 5 and rec.modified
        assert not any(n.op_type == "Sqrt" for n in model.graph)
        assert rec.verify["misses"] == [] and rec.verify["figures"]["cosine"] > 0.99999  # compared in ORT
        assert [e["rule"] for e in rec.explanations] == ["_NeverFires"]
        again = run_pipeline(model, "test-rsqrt")
        assert again.records[0].modified is False and again.records[0].counters == {}
    finally:
        _PASSES.pop("test-rsqrt", None)
        _ORIGINS.pop("test-rsqrt", None)


def _pip_target(tmp_path) -> Path:
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(EXAMPLE)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # no download of build tools when setuptools is here
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return target


def test_example_package_installs_and_runs(tmp_path, llama_onnx):
    site = _pip_target(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    res = cli("passes", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    listed = {ln.split()[0]: ln for ln in res.stdout.splitlines() if ln and not ln.startswith(" ")}
    for name in ("drop-nan-guard", "drop-nan-guard-gs", "stamp"):
        assert "entry point" in listed[name] and "llmopt-example-plugin 0.1.0" in listed[name], listed.get(name)
    out = tmp_path / "art"
    pipeline = "drop-nan-guard,fold,cleanup,fuse,kv-cache,stamp{key=ci.build,value=1234},cleanup"
    res = cli("compile", llama_onnx, "--target", "cpu-fp32", "-o", out, "--no-speed", "--passes", pipeline, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "llmopt.json").read_text())
    recs = {p["name"]: p for p in manifest["passes"]}
    assert recs["drop-nan-guard"]["counters"] == {"DropNanGuard": 2}  # one guard per attention layer
    assert recs["stamp"]["counters"] == {"stamped": 1}
    assert manifest["verification"]["passed"]
    assert llmopt.load(out / "model.onnx").metadata_props["ci.build"] == "1234"
    assert "IsNaN" in manifest["artifact"]["source_ops"] and "IsNaN" not in manifest["artifact"]["ops"]

    # the same rewrite written against onnx-graphsurgeon, through the adapter, verified the same way
    out_gs = tmp_path / "art-gs"
    res = cli("compile", llama_onnx, "--target", "cpu-fp32", "-o", out_gs, "--no-speed",
              "--passes", "drop-nan-guard-gs,fold,cleanup,fuse,kv-cache,cleanup", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out_gs / "llmopt.json").read_text())
    rec = manifest["passes"][0]
    assert rec["counters"]["guards_removed"] == 2 and rec["nodes_after"] == rec["nodes_before"] - 4
    assert rec["counters"]["tensors_by_reference"] > 0 and "bytes_loaded" not in rec["counters"]  # weights not read
    assert rec["verify"]["figures"]["max_abs"] == 0.0 and manifest["verification"]["passed"]


RULE_PASS_FILE = """
    from llmopt.core.rules import Rule, rule_pass

    @rule_pass("file-rsqrt")
    class Rsqrt(Rule):
        def pattern(self, op, x):
            return op.Reciprocal(op.Sqrt(x))

        def rewrite(self, op, x):
            return op.Pow(x, op.Constant(value_float=-0.5))
"""

DROPS_OUTPUT = """
    from llmopt import Pass

    class DropOutput(Pass):
        name = "drop-output"
        summary = "removes the last graph output"

        def run(self, model):
            model.graph.outputs.pop()
            return True
"""

BAD_OPTIONS = """
    from llmopt import Pass

    class NotADataclass:
        factor = 1

    class BadOptions(Pass):
        name = "bad-options"
        summary = "its Options is not a dataclass"
        Options = NotADataclass

        def run(self, model):
            return False
"""


def test_rule_pass_in_a_plugin_file_and_its_reproducer(tmp_path, llama_onnx):
    plugin = write_plugin(tmp_path, "rulefile", RULE_PASS_FILE)
    assert llmopt.load_plugin(plugin) == ["file-rsqrt"] == llmopt.load_plugin(plugin)  # twice: same answer
    res = cli("passes", "--plugin", plugin)
    assert res.returncode == 0 and any(ln.startswith("file-rsqrt") for ln in res.stdout.splitlines()), res.stderr
    bad = write_plugin(tmp_path, "explodes", RAISES)
    res = cli("compile", llama_onnx, "-o", tmp_path / "a", "--no-speed", "--plugin", bad, "--passes", "fold,explode")
    assert_one_line_error(res, 1, "'explode'")
    repro = json.loads(Path(res.stderr.strip().rsplit("reproducer: ", 1)[1].rstrip(")")).read_text())
    assert repro["plugins"] == [str(bad.resolve())] and f"--plugin {bad.resolve()}" in repro["reproduce"]
    assert repro["input"] == str(Path(llama_onnx).resolve())


def test_plugin_that_drops_an_output_or_has_bad_options(tmp_path, llama_onnx):
    plugin = write_plugin(tmp_path, "drops", DROPS_OUTPUT)
    res = cli("compile", llama_onnx, "-o", tmp_path / "a", "--no-speed", "--plugin", plugin, "--passes", "fold,drop-output")
    assert_one_line_error(res, 1, "'drop-output' (plugin file", "removed model outputs (removed present.1.value)")
    res = cli("passes", "--plugin", write_plugin(tmp_path, "badopts", BAD_OPTIONS))
    assert_one_line_error(res, 1, "pass 'bad-options': Options must be a frozen dataclass")


def test_a_notebook_cell_run_twice_replaces_its_pass():
    cell = ("from llmopt import Pass, register_pass\n"
            "@register_pass\nclass Cell(Pass):\n    name = 'notebook-pass'\n    summary = 'v'\n"
            "    def run(self, model):\n        return False\n")
    try:
        first, second = {"__name__": "notebook"}, {"__name__": "notebook"}
        exec(cell, first)
        exec(cell, second)  # same module and class name: the new definition wins, no "name is taken"
        assert _PASSES["notebook-pass"] is second["Cell"] is not first["Cell"]
        other = {"__name__": "elsewhere"}
        with pytest.raises(ValueError, match="pass name 'notebook-pass' is taken"):
            exec(cell, other)
    finally:
        _PASSES.pop("notebook-pass", None)
        _ORIGINS.pop("notebook-pass", None)

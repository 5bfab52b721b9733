"""The CI surface: the Python API's result objects, gates, the versioned --json schemas, and the
GitHub-Actions-style example script (docs/examples/ci/gate.sh) failing on a broken plugin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import llmopt
from llmopt.api import schema as llmopt_schema
from llmopt.frontend.exporter import reference_model_dir

REPO = Path(__file__).resolve().parents[1]
EVAL_TEXT = reference_model_dir() / "eval.txt"


def validate(report: dict, name: str) -> None:
    schema = llmopt_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(report, schema, cls=jsonschema.Draft202012Validator)
    assert report["schema"] == schema["$id"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llmopt", *map(str, args)], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """The reference model compiled for cpu-int8 through the Python API, with both gates.

    The speed gate is set where no load on the test machine can miss it: what is tested here is the
    plumbing (measured, evaluated, reported); a missed speed gate is tested with an unreachable one."""
    out = tmp_path_factory.mktemp("ci") / "ref-int8"
    return llmopt.compile("reference", "cpu-int8", out, eval_tokens=2048, max_ppl_increase=0.01, min_speedup=0.01)


def test_compile_result_object_and_schema(gated):
    assert isinstance(gated, llmopt.Artifact)
    assert gated.size_ratio < 0.3 and gated.speedup > 0.01 and abs(gated.perplexity_change) < 0.01
    assert [g["gate"] for g in gated.gates] == ["max_ppl_increase", "min_speedup"]
    assert all(g["passed"] for g in gated.gates)
    ppl, speed = gated.gates
    assert speed["value"] == gated.speedup and speed["limit"] == 0.01
    assert ppl["value"] == gated.perplexity_change and ppl["limit"] == 0.01
    assert gated.to_dict() == json.loads((gated.path / "llmopt.json").read_text())
    validate(gated.report, "compile-report")


def test_missed_gates_fail_with_exit_1_and_keep_the_report(tmp_path):
    out, report = tmp_path / "art", tmp_path / "reports" / "ci.json"
    # 30% magnitude pruning costs the reference model ~3% perplexity (docs/benchmarks.md): over a 1% budget
    res = cli("compile", "reference", "--target", "cpu-int8", "-o", out, "--eval-tokens", "2048",
              "--passes", "fold,cleanup,fuse,prune{sparsity=0.3},kv-cache,quantize-dynamic,cleanup",
              "--threshold", "min_cosine=0.9", "--threshold", "min_top1=0",
              "--max-ppl-increase", "1%", "--min-speedup", "1000", "--report", report)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: compiled model misses its gates: perplexity change") and "required 1000.0x" in last
    assert not out.exists() and "Traceback" not in res.stderr
    r = json.loads(report.read_text())
    validate(r, "compile-report")
    assert [g["passed"] for g in r["gates"]] == [False, False] and "seconds" not in r
    assert r["gates"][0]["value"] == r["accuracy"]["perplexity_change"] > 0.01
    res = cli("report", report, "--markdown", tmp_path / "failed.md")  # a failed compile's report renders too
    assert res.returncode == 0, res.stderr[-2000:]
    md = (tmp_path / "failed.md").read_text()
    assert "Gates: MISSED" in md and "max_ppl_increase" in md and "FAIL" in md


def test_gates_needing_a_measurement_fail_before_any_work(tmp_path, llama_onnx):
    res = cli("compile", llama_onnx, "-o", tmp_path / "a", "--max-ppl-increase", "1%")
    assert res.returncode == 2 and "--max-ppl-increase needs a text" in res.stderr
    res = cli("compile", llama_onnx, "-o", tmp_path / "a", "--min-speedup", "2", "--no-speed")
    assert res.returncode == 2 and "--min-speedup needs the speed measurement" in res.stderr
    res = cli("compile", llama_onnx, "-o", tmp_path / "a", "--max-ppl-increase", "one percent", "--eval-text", EVAL_TEXT)
    assert res.returncode == 2 and "is not a percentage or a fraction" in res.stderr
    assert not (tmp_path / "a").exists()


def test_evaluate_api_cli_and_schema(gated, tmp_path):
    source = llmopt.export("reference", tmp_path / "src" / "model.onnx", with_past=True)
    result = llmopt.evaluate(gated.path, EVAL_TEXT, baseline=source, tokens=2048, max_ppl_increase=0.01)
    assert isinstance(result, llmopt.EvalResult) and result.passed
    # the same tokens and model as the compile's own accuracy figure
    assert result.perplexity == pytest.approx(gated.report["accuracy"]["compiled_perplexity"], rel=1e-4)
    assert result.perplexity_change == pytest.approx(gated.perplexity_change, abs=1e-4)
    validate(result.to_dict(), "eval-report")
    # int8 is within noise of fp32 on these tokens (either sign): gate whichever of the two is worse
    model, base = (gated.path, source) if result.perplexity_change > 0 else (source, gated.path)
    res = cli("eval", model, "--text", EVAL_TEXT, "--tokens", "2048", "--baseline", base, "--json",
              "--max-ppl-increase", "0%")
    assert res.returncode == 1, res.stderr[-2000:]  # the gate is missed: JSON still printed, then the error
    printed = json.loads(res.stdout)
    validate(printed, "eval-report")
    expected = result.perplexity_change if model == gated.path else result.baseline_perplexity / result.perplexity - 1
    assert printed["perplexity_change"] == pytest.approx(expected, abs=1e-5) and expected > 0
    assert printed["gates"][0]["passed"] is False and "perplexity change +" in res.stderr


def test_benchmark_api_and_schema(gated):
    result = llmopt.benchmark(gated.path, prompt_len=8, new_tokens=4, repeats=1)
    assert isinstance(result, llmopt.BenchResult)
    assert result.decode_tokens_per_s(1) > 0 and result.kv_cache_bytes(1) > 0
    validate(result.to_dict(), "bench-report")
    with pytest.raises(ValueError, match="no baseline"):
        result.decode_speedup(1)
    res = cli("bench", gated.path, "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    validate(json.loads(res.stdout), "bench-report")


def test_compile_json_matches_schema(tmp_path, llama_onnx):
    res = cli("compile", llama_onnx, "--target", "cpu-fp32", "-o", tmp_path / "a", "--no-speed", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    validate(json.loads(res.stdout), "compile-report")


def _gate_sh(tmp_path, name, **env):
    bindir = str(Path(sys.executable).parent)  # the `llmopt` and `python` of this environment
    full_env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), **env}
    return subprocess.run(["bash", str(REPO / "docs" / "examples" / "ci" / "gate.sh"), "reference", str(tmp_path / name)],
                          capture_output=True, text=True, env=full_env, cwd=tmp_path)


def test_ci_example_script_passes_then_fails_on_a_broken_plugin(tmp_path):
    ok = _gate_sh(tmp_path, "good")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "gate passed" in ok.stdout and (tmp_path / "good.md").is_file()
    assert all(g["passed"] for g in json.loads((tmp_path / "good.report.json").read_text())["gates"])

    broken = _gate_sh(tmp_path, "broken", BROKEN="1")
    assert broken.returncode == 1, broken.stderr[-3000:]
    assert "'scale-first-weight' (plugin file" in broken.stderr and "changed the logits" in broken.stderr
    assert "::error::llmopt compile failed (exit 1)" in broken.stderr
    assert not (tmp_path / "broken").exists()


def test_inputs_checked_before_any_work(tmp_path, llama_onnx):
    res = cli("compile", llama_onnx, "-o", tmp_path / "a", "--eval-text", tmp_path / "missing.txt")
    assert res.returncode == 2 and "evaluation text not found" in res.stderr and "pass " not in res.stderr
    text = tmp_path / "t.txt"
    text.write_text("some text")
    res = cli("compile", llama_onnx, "-o", tmp_path / "a", "--eval-text", text)  # the tiny model has no tokenizer
    assert res.returncode == 2 and "no tokenizer.json to tokenize --eval-text" in res.stderr and "pass " not in res.stderr
    res = cli("compile", llama_onnx, "-o", tmp_path / "a", "--report", tmp_path)
    assert res.returncode == 2 and "is a directory" in res.stderr and "pass " not in res.stderr
    res = cli("compile", llama_onnx, "-o", tmp_path / "a", "--max-ppl-increase", "1", "--eval-text", EVAL_TEXT)
    assert res.returncode == 2 and "did you mean 1%?" in res.stderr
    assert not (tmp_path / "a").exists()


def test_eval_bad_input_is_one_line(gated):
    for args, needle in ((["--window", "1"], "at least 2 tokens"), (["--tokens", "-5"], "must be >= 0")):
        res = cli("eval", gated.path, "--text", EVAL_TEXT, *args)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]
    res = cli("eval", gated.path)  # a usage error (missing --text): click's message, exit 2, no traceback
    assert res.returncode == 2 and "Missing option '--text'" in res.stderr and "Traceback" not in res.stderr


def test_artifact_holds_exactly_what_the_target_emits(gated):
    """The reference model (a tokenizer, a KV cache): every file a target declares, and no other."""
    from llmopt.core.registry import get_target

    files = set(os.listdir(gated.path))
    assert files == set(get_target("cpu-int8").emits) == set(gated.manifest["target"]["emits"])
    assert files == set(gated.manifest["artifact"]["files"]) | {"llmopt.json"}

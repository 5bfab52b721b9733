"""The command line: every bad input gets one line, exit 2, no traceback; the input is never modified."""

import json
import shutil
import subprocess
import sys

import pytest

from llmopt.core import model_io


def llmopt_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmopt", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_clean_error(res, code, *needles):
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def model_copy(exported, tmp_path):
    src = exported("llama", True)
    dst = tmp_path / "src"
    dst.mkdir()
    for f in model_io.model_files(src):
        shutil.copy(f, dst / f.name)
    return dst / src.name


def test_bad_inputs(tmp_path, model_copy):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 10)
    (tmp_path / "zero.onnx").write_bytes(b"")
    data = model_copy.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    cases = [
        (tmp_path / "missing.onnx", "no such file or directory"),
        (tmp_path / "empty_dir", "directory holds no model.onnx"),
        (tmp_path / "text.onnx", "not a valid ONNX model"),
        (tmp_path / "zero.onnx", "file is empty"),
        (tmp_path / "trunc.onnx", "not a valid ONNX model"),
    ]
    for path, needle in cases:
        res = llmopt_cli("compile", path, "-o", tmp_path / "out")
        assert_clean_error(res, 2, str(path.name), needle)
        assert not (tmp_path / "out").exists()
    res = llmopt_cli("inspect", tmp_path / "text.onnx")
    assert_clean_error(res, 2, "not a valid ONNX model")


def test_truncated_or_missing_external_data(tmp_path, model_copy):
    data_file = model_copy.with_name(model_copy.name + ".data")
    blob = data_file.read_bytes()
    data_file.write_bytes(blob[: len(blob) // 2])
    assert_clean_error(llmopt_cli("compile", model_copy, "-o", tmp_path / "o"), 2, "is truncated", "re-export")
    data_file.unlink()
    assert_clean_error(llmopt_cli("inspect", model_copy), 2, "is missing", "keep it next to the .onnx file")


def test_bad_pipeline_target_and_options(tmp_path, model_copy):
    before = model_io.sha256_files(model_io.model_files(model_copy))
    out = tmp_path / "out"
    cases = [
        (["--target", "gpu-int3"], "unknown target 'gpu-int3'"),
        (["--passes", "fold,quantise-dynamic"], "unknown pass 'quantise-dynamic' (did you mean 'quantize-dynamic'?)"),
        (["--passes", "fold{limit=3}"], "pass 'fold' has no option 'limit'"),
        (["--passes", "fold{input_size_limit=big}"], "must be an integer"),
        (["--passes", "fold,{x}"], "malformed pipeline"),
        (["--passes", "fold", "--recipe", tmp_path / "r.toml"], "not both"),
        (["--recipe", tmp_path / "none.toml"], "recipe file not found"),
        (["--threshold", "min_cosine"], "is not KEY=NUMBER"),
        (["--threshold", "cosine=0.9"], "unknown threshold 'cosine'"),
    ]
    for extra, needle in cases:
        assert_clean_error(llmopt_cli("compile", model_copy, "-o", out, *extra), 2, needle)
        assert not out.exists()
    assert model_io.sha256_files(model_io.model_files(model_copy)) == before


def test_output_that_is_not_an_artifact_is_refused(tmp_path, model_copy):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert_clean_error(llmopt_cli("compile", model_copy, "-o", busy), 2, "is not an llmopt artifact")
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_clean_error(llmopt_cli("compile", model_copy, "-o", afile), 2, "exists and is a file")
    # the input's own folder is not an artifact either, and the more precise reason is given
    assert_clean_error(llmopt_cli("compile", model_copy, "-o", model_copy.parent), 2, "holds the input model")


def test_compile_json_report_and_budget_failure(tmp_path, model_copy):
    before = model_io.sha256_files(model_io.model_files(model_copy))
    res = llmopt_cli("compile", model_copy, "-o", tmp_path / "ok", "--json", "--no-speed", "--verify-each")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["verification"]["passed"] and all("verify" in p for p in report["passes"])
    # a CI job's budget that the compile misses: exit 1, JSON report, no artifact
    res = llmopt_cli("compile", model_copy, "-o", tmp_path / "strict", "--threshold", "max_abs=1e-9",
                     "--report", tmp_path / "r.json", "--no-speed")
    assert_clean_error(res, 1, "misses the cpu-int8 accuracy budget", "max-abs error")
    assert not (tmp_path / "strict").exists()
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["passed"] is False
    assert model_io.sha256_files(model_io.model_files(model_copy)) == before


def test_summary_passes_targets_inspect(tmp_path, model_copy):
    res = llmopt_cli("compile", model_copy, "-o", tmp_path / "a", "--target", "cpu-int8")
    assert res.returncode == 0, res.stderr
    for word in ("size", "speed", "verify    PASS", "pass    [7/8] quantize-dynamic"):
        assert word in res.stdout + res.stderr
    res = llmopt_cli("passes")
    assert res.returncode == 0 and "quantize-dynamic" in res.stdout and "input_size_limit=8192" in res.stdout
    res = llmopt_cli("targets", "--json")
    assert json.loads(res.stdout)["cpu-int8"]["pipeline"] == "fold,cleanup,fuse,kv-cache,logits-to-keep,quantize-moe{bits=8,block_size=128},quantize-dynamic,cleanup"
    res = llmopt_cli("inspect", tmp_path / "a", "--json")
    info = json.loads(res.stdout)
    assert info["ops"]["com.microsoft::MatMulNBits"] >= 1
    assert info["kv_cache"]["bytes_per_token"] == 512


def test_export_cli(tmp_path, hf_dirs):
    res = llmopt_cli("export", hf_dirs("gpt2"), "-o", tmp_path / "g.onnx", "--with-past")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "g.onnx").is_file() and (tmp_path / "g.onnx.data").is_file()
    assert_clean_error(llmopt_cli("export", tmp_path, "-o", tmp_path / "x.onnx"), 2, "not a Hugging Face model directory")
    assert_clean_error(llmopt_cli("compile", hf_dirs("gpt2") / "config.json", "-o", tmp_path / "y"), 2, "not a valid ONNX model")

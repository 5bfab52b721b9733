"""Nothing lost, nothing half-written, no traceback: every path is checked before work starts,
outputs are published atomically, and what killed runs leave behind is swept.

Each test here failed on main at ceae7af (issue 12), before the fix it names."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import llmopt
from llmopt.core import atomic
from llmopt.core import model_io
from llmopt.errors import OutputError
from llmopt.frontend.exporter import reference_model_dir

from test_cli import assert_clean_error, llmopt_cli


def digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def src(exported, tmp_path):
    """A private copy of the tiny Llama export (with KV cache): model.onnx + model.onnx.data."""
    d = tmp_path / "src"
    d.mkdir()
    original = exported("llama", True)
    for f in model_io.model_files(original):
        shutil.copy(f, d / f.name.replace(original.name, "model.onnx"))
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "model.onnx.data"
    onnx.save(m, str(d / "model.onnx"))
    return d / "model.onnx"


def files_of(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


# ------------------------------------------------------------------ pre-flight: outputs vs inputs


def test_report_at_the_input_is_refused_and_the_input_kept(src, tmp_path):
    before = digest(files_of(src.parent))
    for report in (src, src.with_name("model.onnx.data")):
        res = llmopt_cli("compile", src, "-o", tmp_path / "art", "--report", report, "--no-speed")
        assert_clean_error(res, 2, "--report", "is the input")
        assert "pass " not in res.stderr  # refused before any work
    assert digest(files_of(src.parent)) == before
    assert not (tmp_path / "art").exists()


def test_output_dir_holding_the_input_is_refused(src):
    res = llmopt_cli("compile", src, "-o", src.parent, "--no-speed")
    assert_clean_error(res, 2, "-o", "holds the input")
    res = llmopt_cli("compile", src, "-o", src.parent.parent, "--no-speed")
    assert_clean_error(res, 2, "-o")


def test_report_inside_the_artifact_is_refused_before_work(src, tmp_path):
    res = llmopt_cli("compile", src, "-o", tmp_path / "art", "--report", tmp_path / "art" / "r.json")
    assert_clean_error(res, 2, "--report", "inside -o")
    assert not (tmp_path / "art").exists() and "pass " not in res.stderr


def test_file_shadowed_parents_are_refused_before_work(src, tmp_path):
    (tmp_path / "afile").write_text("x")
    res = llmopt_cli("compile", src, "-o", tmp_path / "art", "--report", tmp_path / "afile" / "r.json")
    assert_clean_error(res, 2, "--report", "is a file, not a directory")
    assert not (tmp_path / "art").exists() and "pass " not in res.stderr
    res = llmopt_cli("compile", src, "-o", tmp_path / "afile" / "out")  # was a FileExistsError traceback
    assert_clean_error(res, 2, "-o", "is a file, not a directory")


def test_unwritable_parent_is_refused(src, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    for parent in (locked, Path("/proc")):  # permissions (as a user), a pseudo-filesystem (also as root)
        if parent == locked and os.geteuid() == 0:
            continue
        res = llmopt_cli("compile", src, "-o", parent / "art")
        assert_clean_error(res, 2, "-o", "cannot write in")


def test_export_output_checked_before_export(hf_dirs, tmp_path):
    (tmp_path / "afile").write_text("x")
    res = llmopt_cli("export", hf_dirs("llama"), "-o", tmp_path / "afile" / "m.onnx")
    assert_clean_error(res, 2, "is a file, not a directory")
    hf = hf_dirs("llama")
    weights = next(hf.glob("*.safetensors"))
    before = digest([weights])
    res = llmopt_cli("export", hf, "-o", hf / "config.onnx")  # beside the input: fine; at an input: refused
    assert res.returncode == 0, res.stderr
    (hf / "config.onnx").unlink()
    (hf / "config.onnx.data").unlink()
    assert digest([weights]) == before


# ------------------------------------------------------------------ atomic publishing


def test_export_overwrite_keeps_a_whole_pair_at_every_step(hf_dirs, tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    llmopt.export(hf_dirs("llama"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    first = digest([out, tmp_path / "m.onnx.data"])
    # a crash at the commit point (the .onnx rename): the previous pair is whole and still loads
    real_replace = os.replace

    def crash_on_commit(a, b):
        if Path(b) == out:
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(atomic.os, "replace", crash_on_commit)
    with pytest.raises(KeyboardInterrupt):
        llmopt.export(hf_dirs("llama"), out, with_past=True)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert digest([out, tmp_path / "m.onnx.data"]) == first
    model_io.load(out)
    assert not [p for p in tmp_path.iterdir() if ".llmopt-" in p.name]  # staging removed by the finally
    # a completed overwrite: the new .onnx references a new data file, the old one is gone
    llmopt.export(hf_dirs("llama"), out, with_past=True)
    assert atomic.referenced_data_files(out) == {"m.onnx.1.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.1.data"]
    assert any(v.name.startswith("past_key_values") for v in model_io.load(out).graph.inputs)
    assert atomic.data_file_for(out, atomic.referenced_data_files(out)) == "m.onnx.data"  # and back next time


def test_publish_dir_swaps_in_one_step_and_rolls_back_a_killed_two_rename_publish(tmp_path, monkeypatch):
    out = tmp_path / "art"
    out.mkdir()
    (out / "llmopt.json").write_text("old")
    staging = atomic.staging_path(out)
    (staging / "llmopt.json").write_text("new")
    atomic.publish_dir(staging, out)
    assert (out / "llmopt.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    # the fallback (filesystems without RENAME_EXCHANGE), killed between its two renames:
    aside = tmp_path / f".art.llmopt-old-{_dead_pid()}-abc"
    aside.mkdir()
    os.replace(out, aside / "artifact")
    assert not out.exists()
    assert atomic.sweep(out) == [aside]
    assert (out / "llmopt.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    # and the fallback itself publishes
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    staging = atomic.staging_path(out)
    (staging / "llmopt.json").write_text("newer")
    atomic.publish_dir(staging, out)
    assert (out / "llmopt.json").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_compile_sweeps_what_killed_runs_left(src, tmp_path):
    dead = _dead_pid()
    out = tmp_path / "art"
    leftovers = [tmp_path / f".art.llmopt-new-{dead}-x1", tmp_path / f".r.json.llmopt-tmp-{dead}-x2"]
    leftovers[0].mkdir()
    (leftovers[0] / "model.onnx.data").write_bytes(b"\0" * 1000)
    leftovers[1].write_text("{")
    alive = tmp_path / f".art.llmopt-new-{os.getpid()}-x3"  # a live writer's: kept
    alive.mkdir()
    temp = Path(atomic.tempfile.gettempdir())
    work = [temp / f"llmopt-work-{dead}-x4", temp / f"llmopt-verify-{dead}-x5", temp / f"llmopt-calib-{dead}-x6"]
    for w in work:
        w.mkdir(exist_ok=True)
    llmopt.compile(src, "cpu-fp32", out, report_path=tmp_path / "r.json", measure_speed=False)
    assert not any(p.exists() for p in leftovers + work) and alive.exists()
    assert not list(temp.glob(f"llmopt-*-{os.getpid()}-*"))  # this process's own temp dirs are gone too


def test_failed_compile_with_report_leaves_no_artifact_and_the_previous_one_intact(src, tmp_path):
    out = tmp_path / "art"
    llmopt.compile(src, "cpu-fp32", out, measure_speed=False)
    before = digest(files_of(out))
    report = tmp_path / "reports" / "r.json"
    res = llmopt_cli("compile", src, "-o", out, "--target", "cpu-int8", "--threshold", "min_cosine=1",
                     "--threshold", "max_abs=0", "--report", report)
    assert_clean_error(res, 1, "misses the cpu-int8 accuracy budget")
    assert json.loads(report.read_text())["verification"]["passed"] is False
    assert digest(files_of(out)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "reports", "src"]


def test_unsupported_ops_write_the_report(src, tmp_path):
    report = tmp_path / "r.json"
    res = llmopt_cli("compile", src, "-o", tmp_path / "art", "--target", "cuda-int8", "--no-speed",
                     "--passes", "fold,cleanup,quantize-dynamic{kernel=dynamic}", "--report", report)
    assert_clean_error(res, 1, "does not implement", "DynamicQuantizeMatMul")
    r = json.loads(report.read_text())
    assert r["target"]["name"] == "cuda-int8" and "com.microsoft::DynamicQuantizeMatMul" in r["artifact"]["ops"]
    assert not (tmp_path / "art").exists()


# ------------------------------------------------------------------ one line, not a traceback


def test_cuda_fp16_with_default_options_reports_its_speed(tmp_path):
    res = llmopt_cli("compile", "reference", "--target", "cuda-fp16", "-o", tmp_path / "a")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x speedup" in res.stdout and "not the target's CUDAExecutionProvider" in res.stdout
    report = json.loads((tmp_path / "a" / "llmopt.json").read_text())
    speed = report["speed"]
    assert speed["speedup"] > 0 and speed["provider"] == "CPUExecutionProvider" and speed["pairs"] == 15
    assert report["verification"]["passed"] and report["accuracy"]["perplexity_change"] < 0.01


@pytest.mark.parametrize("location", ["../secret.bin", "ABSOLUTE"])
def test_external_data_outside_the_model_folder_is_refused_at_load(src, tmp_path, location):
    secret = tmp_path / "secret.bin"
    shutil.copy(src.with_name("model.onnx.data"), secret)
    if location == "ABSOLUTE":
        location = str(secret)
    m = onnx.load(str(src), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(src))
    for cmd in (["compile", src, "-o", tmp_path / "art"], ["inspect", src]):
        res = llmopt_cli(*cmd)
        assert_clean_error(res, 2, "outside the model's folder", location)
    assert not (tmp_path / "art").exists() and not list(Path(".").glob("llmopt-crash-*"))


def test_bad_numbers_and_texts_are_one_line(src, tmp_path):
    art = tmp_path / "art"
    llmopt.compile(src, "cpu-fp32", art, measure_speed=False)
    for threads in ("0", "-1"):
        assert_clean_error(llmopt_cli("bench", art, "--threads", threads), 2, "--threads")
        assert_clean_error(llmopt_cli("generate", art, "--prompt-ids", "1,2", "--threads", threads), 2, "--threads")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait, na\xefve\n".encode("latin-1") * 50)
    shutil.copy(reference_model_dir() / "tokenizer.json", art / "tokenizer.json")
    assert_clean_error(llmopt_cli("eval", art, "--text", latin), 2, "not UTF-8")
    assert_clean_error(llmopt_cli("compile", "reference", "-o", tmp_path / "x", "--eval-text", latin), 2, "not UTF-8")
    assert_clean_error(llmopt_cli("compile", src, "-o", tmp_path / "x", "--passes", ""), 2, "empty pipeline")
    for bad in ("min_cosine=nan", "min_cosine=2", "max_abs=-1", "min_top1=inf"):
        assert_clean_error(llmopt_cli("compile", src, "-o", tmp_path / "x", "--threshold", bad), 2, "--threshold")
    assert not (tmp_path / "x").exists()


def test_genai_config_without_bos_loads_in_onnxruntime_genai(hf_dirs, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs("gpt2"), hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.pop("bos_token_id", None)
    (hf / "config.json").write_text(json.dumps(cfg))
    (hf / "generation_config.json").unlink(missing_ok=True)
    art = llmopt.compile(hf, "cpu-fp32", tmp_path / "art", measure_speed=False)
    gcfg = json.loads((art.path / "genai_config.json").read_text())
    assert "bos_token_id" not in gcfg["model"] and None not in gcfg["model"].values()
    model = og.Model(str(art.path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=8)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([[5, 6, 7]], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == 8


def test_write_atomic_refuses_a_directory_and_leaves_no_temp_file(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        atomic.write_atomic(tmp_path, "x")
    atomic.write_atomic(tmp_path / "a" / "b.json", "{}")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_interrupt_removes_this_process_work_dirs_only(tmp_path):
    """Ctrl-C can land inside a cleanup (the rmtree in a finally); the CLI then removes what this
    process left in the temp dir, and nothing of another live process."""
    import os
    import tempfile

    from llmopt.core import atomic

    mine = atomic.work_dir("verify")
    (mine / "model.onnx").write_bytes(b"x")
    other = Path(tempfile.mkdtemp(prefix=f"llmopt-verify-{os.getppid()}-"))  # a live process's
    try:
        assert atomic.remove_own_work_dirs() == [mine]
        assert not mine.exists() and other.exists()
    finally:
        shutil.rmtree(other, ignore_errors=True)

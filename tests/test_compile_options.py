"""CompileOptions: one frozen value for every compile setting, validated at construction; the CLI
and ``llmopt.compile`` (keywords or ``options=``) reach the same entry point with it. Also what a
target declares: the session options applied to the artifact's sessions, the files it emits."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

import llmopt
from llmopt import CompileOptions, InputError
from llmopt.compiler import measure
from llmopt.compiler.options import THRESHOLD_RANGES
from llmopt.core.registry import all_targets, get_target
from llmopt.ort import sessions, verify
from llmopt.targets.base import OPTIMIZATION_LEVELS


def test_defaults_normalization_and_frozen():
    opts = CompileOptions()
    assert opts.target == "cpu-int8" and opts.out is None and opts.verify_model and opts.measure_speed
    assert (opts.eval_tokens, opts.speed_pairs, opts.thresholds, opts.explain, opts.plugins) == (8192, 15, {}, (), ())
    opts = CompileOptions(out="a/b", eval_text="e.txt", explain=["fuse"], plugins="p.py", thresholds={"min_top1": 0})
    assert opts.out == Path("a/b") and opts.eval_text == Path("e.txt")
    assert opts.explain == ("fuse",) and opts.plugins == (Path("p.py"),) and opts.thresholds == {"min_top1": 0.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.target = "cpu-fp32"
    assert hash(opts) == hash(dataclasses.replace(opts))  # usable as a key (a cache of compiles)
    assert llmopt.compiler.CompileOptions is CompileOptions and "CompileOptions" in llmopt.__all__


@pytest.mark.parametrize("settings, needle", [
    ({"target": ""}, "--target '': give a target name"),
    ({"eval_tokens": -5}, "--eval-tokens -5: must be an integer >= 0"),
    ({"speed_pairs": 0}, "speed_pairs=0: must be an integer >= 1"),
    ({"verify_model": "yes"}, "verify_model='yes': must be True or False"),
    ({"thresholds": {"cosine": 0.9}}, "unknown threshold 'cosine'"),
    ({"thresholds": {"min_cosine": 2}}, "--threshold min_cosine=2: must be a number in [-1, 1]"),
    ({"passes": "fold", "recipe": "r.toml"}, "give --passes or --recipe, not both"),
    ({"max_ppl_increase": -0.1}, "--max-ppl-increase must be >= 0"),
    ({"max_ppl_increase": "1%"}, "--max-ppl-increase '1%': must be a number"),
    ({"min_speedup": 0}, "--min-speedup must be > 0"),
    ({"explain": [3]}, "--explain 3: must be a pass name"),
    ({"out": 5}, "-o 5: must be a path"),
    ({"progress": "loud"}, "progress='loud': must be a function"),
])
def test_bad_values_are_one_line_input_errors(settings, needle):
    with pytest.raises(InputError) as info:
        CompileOptions(**settings)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_threshold_ranges_name_every_threshold():
    assert set(THRESHOLD_RANGES) == {f.name for f in dataclasses.fields(verify.Thresholds)}


def test_build_from_keywords():
    base = CompileOptions(target="cpu-fp32", measure_speed=False)
    assert CompileOptions.build(base) is base
    assert CompileOptions.build(base, target="cpu-int4") == dataclasses.replace(base, target="cpu-int4")
    assert CompileOptions.build(None, eval_tokens=16) == CompileOptions(eval_tokens=16)
    with pytest.raises(TypeError, match="unexpected keyword argument 'measure'"):
        CompileOptions.build(None, measure=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'measure'"):
        llmopt.compile("model.onnx", measure=False)


def test_bad_option_fails_before_any_work(tmp_path, llama_onnx):
    out = tmp_path / "a"
    with pytest.raises(InputError, match="speed_pairs=0"):
        llmopt.compile(llama_onnx, out=out, speed_pairs=0)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _comparable(manifest):
    """A manifest without what differs between two runs of one compile (times, paths, figures)."""
    m = json.loads(json.dumps(manifest))
    for key in ("created", "seconds", "speed"):
        m.pop(key, None)
    for p in m["passes"]:
        p.pop("seconds")
    return m


def test_options_and_keywords_compile_the_same(tmp_path, llama_onnx, monkeypatch):
    made = []
    real = sessions.make_session

    def spy(path, *args, **kwargs):
        made.append((Path(path), kwargs.get("optimization")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sessions, "make_session", spy)
    opts = CompileOptions(target="cpu-fp32", out=tmp_path / "a", speed_pairs=2)
    by_options = llmopt.compile(llama_onnx, options=opts)
    by_position = llmopt.compile(llama_onnx, dataclasses.replace(opts, out=tmp_path / "b"), measure_speed=False)
    by_keywords = llmopt.compile(llama_onnx, "cpu-fp32", tmp_path / "c", measure_speed=False)
    assert by_options.path == tmp_path / "a" and by_options.manifest["speed"]["pairs"] == 2
    assert by_position.manifest["speed"] is None and by_keywords.manifest["speed"] is None
    assert _comparable(by_position.manifest) == _comparable(by_keywords.manifest)
    assert _comparable(by_options.manifest) == _comparable(by_keywords.manifest)
    assert by_options.report is by_options.manifest  # the old name still reads the manifest
    # the measurement sessions on the compiled model applied the target's session options
    compiled = [opt for path, opt in made if path.parent.name.startswith(".a.llmopt-new")]  # the staged artifact
    level = get_target("cpu-fp32").session_options["graph_optimization_level"]
    assert compiled and all(opt == OPTIMIZATION_LEVELS[level] == "all" for opt in compiled)


def test_artifact_session_applies_session_options(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(sessions, "make_session", lambda path, providers, **kw: seen.update(kw, providers=providers))
    target = dataclasses.replace(get_target("cuda-int8"), session_options={"graph_optimization_level": "ORT_ENABLE_BASIC"})
    measure.artifact_session(target, tmp_path / "model.onnx", threads=2)
    assert seen == {"optimization": "basic", "threads": 2, "providers": ("CPUExecutionProvider",)}


def test_target_refuses_session_options_it_cannot_apply():
    base = get_target("cpu-int8")
    with pytest.raises(ValueError, match="session option 'intra_op_num_threads' is not one llmopt applies"):
        dataclasses.replace(base, session_options={"intra_op_num_threads": 4})
    with pytest.raises(ValueError, match="graph_optimization_level 'ALL' is not one of"):
        dataclasses.replace(base, session_options={"graph_optimization_level": "ALL"})


def test_artifact_files_are_declared(tmp_path, llama_onnx):
    """A tokenizer-less decoder's artifact: a subset of what every target declares it emits."""
    art = llmopt.compile(llama_onnx, target="cpu-int8", out=tmp_path / "a", measure_speed=False)
    files = set(os.listdir(art.path))
    assert {"model.onnx", "model.onnx.data", "llmopt.json"} <= files <= set(art.manifest["target"]["emits"])
    assert files == set(art.manifest["artifact"]["files"]) | {"llmopt.json"}
    assert all(t.emits == get_target("cpu-int8").emits for t in all_targets().values())

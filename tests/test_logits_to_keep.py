"""logits-to-keep: the lm_head computes only the last k positions when asked; by default every
position, so callers that do not know the input see the graph unchanged. Checked in ONNX Runtime
against the graph without the pass, on llmopt's exports and on an export llmopt did not make."""

import numpy as np
import onnxruntime as ort
import pytest

import llmopt
from llmopt.core import model_io
from llmopt.core.manager import run_pipeline
from llmopt.ort import verify
from llmopt.ort.generation import Generator
from llmopt.passes.logits_to_keep import INPUT

BASE = "fold,cleanup,fuse,kv-cache,cleanup"
WITH = "fold,cleanup,fuse,kv-cache,logits-to-keep,cleanup"


def _compile(src, pipeline, out):
    model = llmopt.load(src)
    result = run_pipeline(model, pipeline)
    model_io.save(model, out)
    return result


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])  # plain, tied (FusedMatMul transB), scaled embeddings
def test_kept_logits_are_the_last_rows_and_default_keeps_all(exported, tmp_path, arch):
    src = exported(arch, True)
    res = _compile(src, WITH, tmp_path / "with.onnx")
    assert next(r for r in res.records if r.name == "logits-to-keep").counters["lm_head_sliced"] == 1
    _compile(src, BASE, tmp_path / "base.onnx")
    with_, base = _session(tmp_path / "with.onnx"), _session(tmp_path / "base.onnx")
    assert INPUT in {i.name for i in with_.get_overridable_initializers()}
    assert INPUT not in {i.name for i in with_.get_inputs()}  # optional: callers may leave it out
    feeds = verify.sample_inputs(llmopt.load(tmp_path / "base.onnx"), verify.SampleShape(2, 9, 0), seed=3)
    full = base.run(["logits"], feeds)[0]
    np.testing.assert_allclose(with_.run(["logits"], feeds)[0], full, atol=1e-5)  # default: every position
    for k in (1, 3):
        kept = with_.run(["logits"], {**feeds, INPUT: np.array(k, dtype=np.int64)})[0]
        assert kept.shape == (2, k, full.shape[-1])
        np.testing.assert_allclose(kept, full[:, -k:], atol=1e-5)


def test_generation_keeps_ragged_prompts_exact(exported, tmp_path):
    """Prompts of different lengths: the prefill keeps enough positions for the shortest one."""
    src = exported("llama", True)
    _compile(src, WITH, tmp_path / "with.onnx")
    _compile(src, BASE, tmp_path / "base.onnx")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [21, 22, 23], [40]]
    a, b = Generator(tmp_path / "with.onnx"), Generator(tmp_path / "base.onnx")
    assert a.keeps_logits and not b.keeps_logits
    assert a.generate(prompts, 10).tokens == b.generate(prompts, 10).tokens
    assert Generator(tmp_path / "with.onnx", naive=True, buffer="concat").generate(prompts, 10).tokens == b.generate(prompts, 10).tokens


def test_input_ids_only_export_gets_it_by_default(exported_ids_only, tmp_path):
    """The plain torch.onnx export (no mask, no cache), compiled with cpu-int8's defaults."""
    art = llmopt.compile(exported_ids_only("qwen2"), target="cpu-int8", out=tmp_path / "a")
    rec = next(p for p in art.manifest["passes"] if p["name"] == "logits-to-keep")
    assert rec["counters"]["lm_head_sliced"] == 1
    gen = Generator(tmp_path / "a")
    assert gen.keeps_logits
    prompt = [[3, 4, 5, 6, 7, 8]]
    assert gen.generate(prompt, 8).tokens == Generator(tmp_path / "a", naive=True, buffer="concat").generate(prompt, 8).tokens


def test_no_lm_head_is_left_alone_with_a_warning(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["input_ids_f"], ["logits"]),
                           helper.make_node("Cast", ["input_ids"], ["input_ids_f"], to=TensorProto.FLOAT)], "g",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "m.onnx")
    res = run_pipeline(llmopt.load(tmp_path / "m.onnx"), "logits-to-keep")
    assert not res.records[0].counters and any("logits-to-keep: no lm_head" in w for w in res.warnings)
    assert INPUT not in {v.name for v in res.model.graph.inputs}

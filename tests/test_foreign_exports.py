"""Graphs llmopt did not make compile with the targets' defaults: the TorchScript exporter's form
(the one Hugging Face Optimum uses) and onnxruntime-genai's model builder output (already fused,
symbolic head size). The input_ids-only dynamo export is in test_compile.py; every architecture ×
form is in benchmarks/coverage.py (docs/coverage.md)."""

import shutil
import subprocess
import sys

import pytest

import llmopt
from llmopt.frontend.exporter import reference_model_dir

LAYERS = 2


@pytest.fixture(scope="module")
def torchscript_llama(hf_dirs, tmp_path_factory):
    from llmopt.models.architectures import export_torchscript

    return export_torchscript(hf_dirs("llama"), tmp_path_factory.mktemp("ts") / "model.onnx")


def test_torchscript_export_fuses_like_llmopts_own(torchscript_llama, tmp_path):
    art = llmopt.compile(torchscript_llama, target="cpu-fp32", out=tmp_path / "art")
    r = art.report
    assert r["verification"]["passed"] and r["verification"]["figures"]["max_abs"] < 1e-4
    assert r["speed"]["speedup"] > 0  # the default path, speed measured
    c = next(p for p in r["passes"] if p["name"] == "fuse")["counters"]
    # TorchScript's idioms canonicalized: static head counts, rsqrt as Div(1, x), scalar Where
    assert c["reshape_dims_from_shape"] >= 3 * LAYERS and c["reciprocal_div"] == 2 * LAYERS + 1
    assert c["expand_shape"] >= 2 * LAYERS and c["rotary_embedding"] == 2 * LAYERS
    assert c.get("rolled_back", 0) == 0
    ops = r["artifact"]["ops"]
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    assert ops["com.microsoft::GroupQueryAttention"] == LAYERS  # rotary inside, Q/K/V packed
    assert "Softmax" not in ops and "Pow" not in ops and "Where" not in ops
    assert r["artifact"]["nodes"] <= 35 < r["artifact"]["source_nodes"] / 10  # 609 -> 31
    assert "past_key_values.1.value" in [v["name"] for v in r["io"]["inputs"]]  # kv-cache added one


def test_torchscript_export_compiles_to_cpu_int8(torchscript_llama, tmp_path):
    art = llmopt.compile(torchscript_llama, target="cpu-int8", out=tmp_path / "art")
    assert art.report["verification"]["passed"]
    assert art.report["artifact"]["ops"].get("com.microsoft::GroupQueryAttention") == LAYERS


def test_genai_builder_output_compiles_with_its_cache(hf_dirs, tmp_path):
    """The builder's graph is fused already (GroupQueryAttention, symbolic ``head_size`` in the cache
    inputs): it used to be refused at exit 2; now the cache dims come from the attention and
    quantization, verification and generation apply."""
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs("llama"), hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # the builder saves one
        shutil.copy(reference_model_dir() / name, hf / name)
    out = tmp_path / "builder"
    r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p", "fp32",
                        "-e", "cpu", "-c", tmp_path / "cache"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    src = llmopt.load(out / "model.onnx")
    assert not isinstance(src.graph.inputs[-1].shape[3], int)  # what made it hard: head_size symbolic
    art = llmopt.compile(out / "model.onnx", target="cpu-int8", out=tmp_path / "art")
    rep = art.report
    assert rep["verification"]["passed"]
    assert rep["kv_cache"]["head_dim"] == 16 and rep["kv_cache"]["kv_heads"] == 2
    assert rep["artifact"]["ops"]["com.microsoft::GroupQueryAttention"] == LAYERS
    assert rep["artifact"]["ops"]["com.microsoft::MatMulNBits"] > 0  # the target's 8-bit weights
    from llmopt.ort.generation import Generator

    gen = Generator(art.path).generate([[5, 9, 14, 3]], 8, eos_token_id=-1)
    assert len(gen.tokens[0]) == 8


OPTIMUM_LLAMA = __import__("pathlib").Path(__file__).parent / "data" / "optimum-llama" / "model.onnx"


def test_optimum_export_fuses_like_llmopts_own(tmp_path):
    """A real Optimum export (TorchScript, with past; tests/data/optimum-llama/README.md) fuses to
    GroupQueryAttention with packed Q/K/V and compiles to cpu-int8; the cached artifact generates
    what full recomputation by the source generates."""
    before = OPTIMUM_LLAMA.read_bytes()
    fp32 = llmopt.compile(OPTIMUM_LLAMA, target="cpu-fp32", out=tmp_path / "fp32")
    r = fp32.report
    assert r["verification"]["passed"] and r["verification"]["figures"]["max_abs"] < 1e-4
    c = next(p for p in r["passes"] if p["name"] == "fuse")["counters"]
    assert c["gqa"] == LAYERS and c["pack_qkv"] == LAYERS and c.get("rolled_back", 0) == 0
    assert r["artifact"]["nodes"] <= 45 < r["artifact"]["source_nodes"] / 10
    int8 = llmopt.compile(OPTIMUM_LLAMA, target="cpu-int8", out=tmp_path / "int8")
    assert int8.report["verification"]["passed"] and int8.report["speed"]["speedup"] > 0
    assert OPTIMUM_LLAMA.read_bytes() == before  # the input is never modified
    from llmopt.ort.generation import Generator, greedy_by_recompute

    prompt = [5, 9, 14, 3, 77]
    cached = Generator(fp32.path).generate([prompt], 16, eos_token_id=-1).tokens[0]
    assert cached == greedy_by_recompute(OPTIMUM_LLAMA, prompt, 16)  # the source, its cache inputs empty



@pytest.mark.parametrize("arch,overrides,attrs", [
    ("mistral", {"sliding_window": 12}, {"local_window_size": [12, 12]}),
    # Gemma 2: a soft cap small enough to matter (0.5; real checkpoints: 50), every other layer windowed
    ("gemma2", {"sliding_window": 12, "attn_logit_softcapping": 0.5},
     {"local_window_size": [12, None], "softcap": [0.5, 0.5]}),
])
def test_masks_and_caps_fuse_into_gqa_attributes(tmp_path, arch, overrides, attrs):
    """What the samples are too short or too tame to show. A sliding-window mask becomes
    GroupQueryAttention's ``local_window_size`` (onnxscript's rule dropped it: right on short
    samples, wrong past the window); a logit soft cap
    ``cap * tanh(s / cap)`` becomes ``softcap``. Exported with input_ids only, checked against
    transformers past the window, and cached decoding against full recomputation by the source."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from llmopt.models.architectures import config, export_input_ids_only
    from llmopt.ort.generation import Generator, greedy_by_recompute

    cfg = config(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random scores large enough for the cap to bend them
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(8.0)
    model.save_pretrained(tmp_path / "hf")
    src = export_input_ids_only(tmp_path / "hf", tmp_path / "ids" / "model.onnx")
    art = llmopt.compile(src, target="cpu-fp32", out=tmp_path / "art")
    assert art.report["verification"]["passed"]
    gqa = [n for n in llmopt.load(art.path).graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == LAYERS
    for key, expected in attrs.items():
        got = [n.attributes[key].value if key in n.attributes else None for n in gqa]
        assert got == pytest.approx(expected), key
    ids = np.random.default_rng(0).integers(3, 500, (1, 40))
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    sess = ort.InferenceSession(str(art.path / "model.onnx"))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(40)[None]}
    feeds.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
                  for i in sess.get_inputs() if i.name.startswith("past")})
    got = sess.run(["logits"], {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    prompt = [5, 9, 14, 3, 77]
    assert Generator(art.path).generate([prompt], 24, eos_token_id=-1).tokens[0] == greedy_by_recompute(src, prompt, 24)

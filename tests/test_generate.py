"""`llmopt generate` and the artifact's generation files: the reference model compiled with a shared
KV buffer generates text, and onnxruntime-genai runs the same artifact to the same tokens."""

import json

import pytest

import llmopt
from llmopt.ort.generation import Generator

from test_cli import assert_clean_error, llmopt_cli

PROMPT = "In the beginning God created"


@pytest.fixture(scope="session")
def ref_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ref"
    llmopt.compile("reference", target="cpu-fp32", out=out, measure_speed=False, eval_tokens=256,
                   passes="fold,cleanup,fuse,cleanup,kv-cache{buffer=shared,max_length=256},cleanup")
    return out


def test_artifact_carries_generation_files(ref_artifact):
    report = json.loads((ref_artifact / "llmopt.json").read_text())
    assert report["generation"]["eos_token_id"] == 1 and report["generation"]["tokenizer"]
    assert report["generation"]["kv_buffer"] == "shared"
    cfg = json.loads((ref_artifact / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_hidden_layers"] == report["kv_cache"]["layers"]
    assert cfg["search"]["past_present_share_buffer"] is True
    assert (ref_artifact / "tokenizer.json").is_file()


def test_generate_text_and_json(ref_artifact):
    res = llmopt_cli("generate", ref_artifact, "--prompt", PROMPT, "-n", "12")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"[0] {PROMPT}") and "tokens/s" in res.stderr
    res = llmopt_cli("generate", ref_artifact, "--prompt", PROMPT, "--prompt", "And the LORD said", "-n", "12", "--json")
    data = json.loads(res.stdout)
    assert len(data["tokens"]) == 2 and all(0 < len(t) <= 12 for t in data["tokens"])
    # batch of two, right-padded, gives each row what it gets alone
    alone = Generator(ref_artifact).generate([data["prompts"][1]], 12).tokens[0]
    assert data["tokens"][1] == alone


def test_onnxruntime_genai_runs_the_artifact_unchanged(ref_artifact):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(ref_artifact))
    ids = og.Tokenizer(model).encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 20, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    ours = Generator(ref_artifact).generate([[int(i) for i in ids]], 20).tokens[0]
    assert tokens[: len(ours)] == ours


def test_generate_bad_inputs(ref_artifact, exported, tmp_path):
    assert_clean_error(llmopt_cli("generate", ref_artifact), 2, "--prompt")
    assert_clean_error(llmopt_cli("generate", ref_artifact, "--prompt-ids", "1,x,3"), 2, "comma-separated")
    assert_clean_error(llmopt_cli("generate", ref_artifact, "--prompt-ids", "1,99999"), 2, "outside the vocabulary")
    assert_clean_error(llmopt_cli("generate", ref_artifact, "-p", "x", "-n", "300"), 2, "max_length")
    assert_clean_error(llmopt_cli("generate", exported("llama", False), "--prompt-ids", "1,2"), 2, "no KV-cache inputs")
    assert_clean_error(llmopt_cli("generate", exported("llama", True), "-p", "hello"), 2, "no tokenizer.json")
    assert_clean_error(llmopt_cli("generate", ref_artifact, "-p", "x", "--sample", "--temperature", "0"), 2, "temperature")

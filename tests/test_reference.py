"""The trained reference model: it compiles to cpu-int8 and keeps its perplexity."""

import json

import llmopt
from llmopt.frontend.exporter import reference_model_dir


def test_reference_model_is_complete():
    ref = reference_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "eval.txt", "README.md", "train_log.json"):
        assert (ref / name).is_file(), name
    assert (ref / "model.safetensors").stat().st_size <= 20 * 2**20
    log = json.loads((ref / "train_log.json").read_text())
    assert log["params"] >= 2_000_000


def test_reference_compiles_to_cpu_int8_within_2_percent_perplexity(tmp_path):
    art = llmopt.compile("reference", target="cpu-int8", out=tmp_path / "ref", eval_tokens=4096, speed_pairs=5)
    r = art.report
    assert r["verification"]["passed"]
    acc = r["accuracy"]
    assert acc["tokens"] >= 4000
    assert abs(acc["perplexity_change"]) < 0.02, acc
    assert r["artifact"]["size_ratio"] < 0.4

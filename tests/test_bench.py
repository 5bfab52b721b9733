"""`llmopt bench`: the figures are there, consistent with each other, and the KV-cache bytes match
the formula; bad options get one line and exit 2."""

import json

import pytest

import llmopt
from llmopt.bench import BenchSettings, benchmark

from test_cli import assert_clean_error, llmopt_cli


@pytest.fixture(scope="module")
def artifact(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "art"
    llmopt.compile(exported("llama", False), target="cpu-fp32", out=out, measure_speed=False)
    return out


def test_bench_with_baseline(artifact, exported):
    s = BenchSettings(prompt_len=8, new_tokens=6, batches=(1, 2), repeats=2)
    r = benchmark(artifact, exported("llama", True), s)
    art, base = r["models"]["artifact"], r["models"]["baseline"]
    assert art["kv_buffer"] == "shared" and art["loop"] == "IOBinding"
    assert base["loop"].startswith("naive") and base["kv_buffer"] == "concat"
    for batch in ("1", "2"):
        a, b = art["batches"][batch], base["batches"][batch]
        positions = s.prompt_len + s.new_tokens - 1
        # 2 (K, V) x layers x kv_heads x head_dim x positions x batch x 4 bytes
        assert a["kv_cache_bytes"] == 2 * 2 * 2 * 16 * positions * int(batch) * 4
        assert b["kv_cache_bytes_measured"] == b["kv_cache_bytes"]  # concat: the final present tensors
        assert a["kv_cache_bytes_measured"] == a["kv_cache_bytes_allocated_shared"]  # shared: the preallocated buffers
        assert a["decode_tokens_per_s"] > 0 and a["step_ms_p90"] >= a["step_ms_p50"] > 0
        assert 0 < a["roofline_fraction"] and len(a["steps_ms_last_run"]) == s.new_tokens - 1
        assert r["ratios"][batch]["decode_speedup"] > 0
    assert r["memory_bandwidth_gbs"] > 0 and r["peak_rss_bytes"] > 0


def test_bench_cli(artifact):
    res = llmopt_cli("bench", artifact, "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1")
    assert res.returncode == 0, res.stderr
    assert "decode tok/s" in res.stdout and "roofline" in res.stdout
    res = llmopt_cli("bench", artifact, "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1", "--json")
    assert set(json.loads(res.stdout)["models"]) == {"artifact"}


def test_bench_bad_options(artifact, exported):
    assert_clean_error(llmopt_cli("bench", artifact, "--batch", "1,x"), 2, "--batch")
    assert_clean_error(llmopt_cli("bench", artifact, "--new-tokens", "1"), 2, "--new-tokens")
    assert_clean_error(llmopt_cli("bench", exported("gpt2", False)), 2, "no KV-cache inputs")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        assert_clean_error(llmopt_cli("bench", artifact, "--plot", "p.png"), 2, "matplotlib")

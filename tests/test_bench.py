"""`llmopt bench`: the figures are there, consistent with each other, and the KV-cache bytes match
the formula; bad options get one line and exit 2."""

import json
import resource

import pytest

import llmopt
from llmopt.ort.bench import BenchSettings, benchmark

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
        # the figures agree with each other: tokens/s, s/token, roofline = bytes read / bandwidth / step
        steps = s.new_tokens - 1
        assert a["decode_tokens_per_s"] == pytest.approx(1 / a["decode_s_per_token"], rel=0.01)
        assert a["step_ms_p90"] >= a["step_ms_p50"] > 0 and len(a["steps_ms_last_run"]) == steps
        step_ms = 1e3 * a["decode_s_per_token"] * int(batch)
        roofline_ms = a["bytes_read_per_step"] / (r["memory_bandwidth_gbs"] * 1e9) * 1e3
        assert a["roofline_step_ms"] == pytest.approx(roofline_ms, rel=0.02)
        assert a["roofline_fraction"] == pytest.approx(roofline_ms / step_ms, rel=0.02)
        # a step reads the weights except the embedding table, of which one row per sequence
        w = art["weights_bytes"] - art["weights_bytes_gathered"]
        row = art["weights_bytes_gathered"] // 512  # the tiny llama's vocabulary; its lm_head is not tied
        cache_read = 2 * 2 * 2 * 16 * (s.prompt_len + steps // 2) * int(batch) * 4
        assert a["bytes_read_per_step"] == w + int(batch) * row + cache_read
        assert a["roofline_note"] and "last-level cache" in a["roofline_note"]  # 0.1 MB of weights
        assert set(r["ratios"][batch]) == {"decode_speedup", "prefill_speedup"} and min(r["ratios"][batch].values()) > 0
    assert art["weights_bytes_gathered"] == 512 * 64 * 4  # the embedding table, fp32
    assert r["memory_bandwidth_gbs"] > 0 and r["machine"]["cpu"]
    # the bandwidth probe's 512 MiB buffer lives in a child process: not in this process's peak
    assert r["peak_rss_bytes"] < resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + 1


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
    assert_clean_error(llmopt_cli("bench", artifact, "--plot", artifact / "model.onnx"), 2, "--plot", "is the input")


def test_bench_plot(artifact, tmp_path):
    plot = tmp_path / "steps.png"
    res = llmopt_cli("bench", artifact, "--prompt-len", "4", "--new-tokens", "6", "--repeats", "1", "--plot", plot)
    assert res.returncode == 0, res.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["steps.png"]  # written atomically: no temporary left

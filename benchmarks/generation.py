"""KV cache, generation runtime and tokens/s (issue #4; docs/benchmarks.md, "Generation").

    python benchmarks/generation.py [--out benchmarks/results/generation.json] [--repeats 3]

1. Greedy equality: for every architecture (tiny config, random init) and the trained reference
   model, 100 greedy tokens through the compiled cached graph (`cpu-fp32`: fold, cleanup, fuse,
   kv-cache, cleanup; rewritten from the export *without* a cache where the attention fuses to
   GroupQueryAttention, from the export with one for GPT-2) against 100 greedy tokens by full
   recomputation with the cache-less source graph.
2. Flat decode cost: the ~50M Llama compiled with `kv-cache{buffer=shared,max_length=1024}` (and
   `buffer=concat` for contrast): ms per decode step around position 100 vs around position 900.
3. Tokens/s: `llmopt bench` (a fresh process each) on the ~50M Llama, `cpu-fp32` and `cpu-int8`
   artifacts against the unoptimized export driven by a naive loop, batch 1 and 8, prompt 128,
   100 new tokens, with the roofline fraction.
Keep the machine quiet while it runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llmopt  # noqa: E402
from llmopt.frontend.exporter import export, reference_model_dir  # noqa: E402
from llmopt.models.architectures import ARCHITECTURES, build  # noqa: E402
from llmopt.ort.generation import Generator, greedy_by_recompute  # noqa: E402

from _common import RESULTS, machine  # noqa: E402

NEW = 100


def greedy_equality(work: Path) -> dict:
    rows = {}
    sources = {arch: build(arch, work / f"hf-{arch}") for arch in ARCHITECTURES}
    sources["reference"] = reference_model_dir()
    for name, hf in sources.items():
        plain = export(hf, work / f"{name}.onnx", with_past=False)
        rewritable = name not in ("gpt2", "reference")  # GPT-2: MHA; reference: compiled from its HF dir (with past)
        src = plain if rewritable else (export(hf, work / f"{name}-past.onnx", with_past=True))
        art = llmopt.compile(src, target="cpu-fp32", out=work / f"{name}-fp32", measure_speed=False, eval_tokens=256)
        prompt = list(range(3, 19))
        got = Generator(art.path).generate([prompt], NEW, eos_token_id=-1).tokens[0]
        want = greedy_by_recompute(plain, prompt, NEW)
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        rows[name] = {"cache": "added by kv-cache" if rewritable else "exported, canonicalized by kv-cache",
                      "tokens": len(got), "equal": got == want, "first_difference": first_diff,
                      "kv_buffer": art.report["generation"]["kv_buffer"]}
        print(name, rows[name], flush=True)
    return rows


def flat_cost(work: Path, src: Path) -> dict:
    out = {}
    for buffer in ("shared", "concat"):
        art = llmopt.compile(src, target="cpu-fp32", out=work / f"llama50m-{buffer}", measure_speed=False,
                             passes=f"fold,cleanup,fuse,kv-cache{{buffer={buffer},max_length=1024}},cleanup")
        res = subprocess.run([sys.executable, __file__, "--flat", str(art.path)], capture_output=True, text=True, check=True)
        out[buffer] = json.loads(res.stdout.strip().splitlines()[-1])
        print("flat", buffer, out[buffer], flush=True)
    return out


def time_positions(artifact: str) -> None:
    """Child: prompt of 100 tokens, 801 new; median step time near position 100 and near 900."""
    gen = Generator(artifact, threads=2)
    gen.generate([list(range(3, 103))], 8, eos_token_id=-1)  # warm up
    steps = gen.generate([list(range(3, 103))], 801, eos_token_id=-1).step_seconds
    at100 = statistics.median(steps[:21]) * 1e3  # positions 101..121
    at900 = statistics.median(steps[-21:]) * 1e3  # positions 880..900
    print(json.dumps({"ms_at_100": at100, "ms_at_900": at900, "ratio": at900 / at100, "buffer": gen.layout.buffer}))


def tokens_per_second(work: Path, src: Path, repeats: int) -> dict:
    out = {}
    for target in ("cpu-fp32", "cpu-int8"):
        art = llmopt.compile(src, target=target, out=work / f"llama50m-{target}", measure_speed=False)
        res = subprocess.run([sys.executable, "-m", "llmopt", "bench", str(art.path), "--baseline", str(src),
                              "--batch", "1,8", "--prompt-len", "128", "--new-tokens", "100", "--repeats", str(repeats),
                              "--json"], capture_output=True, text=True, check=True)
        out[target] = json.loads(res.stdout)
        print(target, json.dumps(out[target].get("ratios")), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "generation.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flat", help=argparse.SUPPRESS)
    ap.add_argument("--skip", nargs="*", default=[], choices=["greedy", "flat", "tps"])
    args = ap.parse_args()
    if args.flat:
        return time_positions(args.flat)
    result = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="llmopt-gen-") as tmp:
        work = Path(tmp)
        if "greedy" not in args.skip:
            result["greedy"] = greedy_equality(work)
        src = export(build("llama", work / "hf-llama50m", size="50m"), work / "llama50m.onnx", with_past=True)
        if "flat" not in args.skip:
            result["flat"] = flat_cost(work, src)
        if "tps" not in args.skip:
            result["tps"] = tokens_per_second(work, src, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nmachine: {result['machine']}")
    if "greedy" in result:
        print("\n| model | cache | 100 greedy tokens equal to full recomputation | KV buffer |\n|---|---|---|---|")
        for name, r in result["greedy"].items():
            eq = "yes" if r["equal"] else f"no (first difference at token {r['first_difference']})"
            print(f"| {name} | {r['cache']} | {eq} | {r['kv_buffer']} |")
    if "flat" in result:
        print("\n| KV buffer | ms/step at position ~100 | at ~900 | ratio |\n|---|---|---|---|")
        for buffer, r in result["flat"].items():
            print(f"| {buffer} | {r['ms_at_100']:.2f} | {r['ms_at_900']:.2f} | {r['ratio']:.2f} |")
    if "tps" in result:
        print("\n| model | loop | batch | decode tok/s | prefill tok/s | step ms p50 / p90 | KV cache MiB | roofline | decode speedup vs baseline |")
        print("|---|---|---|---|---|---|---|---|---|")
        for target, r in result["tps"].items():
            for key, m in r["models"].items():
                if key == "baseline" and target != "cpu-fp32":
                    continue  # the same export, measured again beside cpu-int8: its ratio is in the last column
                name = "export (unoptimized)" if key == "baseline" else target
                for batch, b in m["batches"].items():
                    ratio = r["ratios"][batch]["decode_speedup"] if key == "artifact" else 1.0
                    print(f"| {name} | {m['loop']}, {m['kv_buffer']} | {batch} | {b['decode_tokens_per_s']:.0f} | "
                          f"{b['prefill_tokens_per_s']:.0f} | {b['step_ms_p50']:.2f} / {b['step_ms_p90']:.2f} | "
                          f"{b['kv_cache_bytes'] / 2**20:.1f} | {b['roofline_fraction']:.0%} | {ratio:.2f}x |")
        print(f"memory bandwidth (numpy, 2 threads): {r['memory_bandwidth_gbs']} GB/s")


if __name__ == "__main__":
    main()

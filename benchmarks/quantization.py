"""Quantization (issue #5; docs/benchmarks.md, "Quantization").

    python benchmarks/quantization.py [--pairs 40] [--out benchmarks/results/quantization.json]
    python benchmarks/quantization.py --accuracy-only [--qat]     # size and perplexity only

On the trained reference model and on the ~50M Llama (random init, for speed only):

- llmopt: cpu-int8 (8-bit MatMulNBits, dynamic activations), the static alternative (qdq,
  percentile-calibrated, int8 embeddings), cpu-int4 (int4 block 32, GPTQ on the builtin calibration
  text), int4 with round-to-nearest, and the cuda-int8 and cuda-fp16 graphs run by the CPU provider;
- ONNX Runtime's own tools, applied to the same fused fp32 graph (llmopt's cpu-fp32 artifact) so
  that only the quantization differs: `quantize_dynamic` (int8, per channel), `quantize_static`
  (QDQ, the same calibration batches, MinMax), `MatMulNBitsQuantizer` (4 bits, block 32).

Perplexity: the reference's whole held-out eval text. Size: model files. Speed: one new token after
128 cached ones, batch 1, 2 threads, every model run once per round in a fresh process, medians
over rounds; the ratio is fp32 time / model time, median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import llmopt  # noqa: E402
from llmopt.ort import calibration, perplexity as pplx, timing, verify  # noqa: E402
from llmopt.ort import sessions
from llmopt.core import model_io  # noqa: E402
from llmopt.frontend.exporter import export, reference_model_dir  # noqa: E402
from llmopt.models.architectures import build  # noqa: E402

from _common import RESULTS, machine  # noqa: E402

LLMOPT = {
    "cpu-int8 (dynamic, MatMulNBits 8-bit)": ("cpu-int8", None),
    "int8 static QDQ (qdq, percentile)": ("cpu-int8", "fold,cleanup,fuse,kv-cache,qdq{method=percentile,gather=true},cleanup"),
    "cpu-int4 (block 32, GPTQ)": ("cpu-int4", None),
    "int4 block 32, round-to-nearest": ("cpu-int4", "fold,cleanup,fuse,kv-cache,weight-only{bits=4,block_size=32,method=rtn},cleanup"),
    "cuda-int8 graph on the CPU provider": ("cuda-int8", None),
    "cuda-fp16 graph on the CPU provider": ("cuda-fp16", None),
}


def build_models(work: Path, hf: Path, tag: str, calib_source, ort: bool = True) -> dict[str, Path]:
    src = export(hf, work / f"{tag}.onnx", with_past=True)
    models = {"fp32 (export)": src}
    fp32 = llmopt.compile(hf, target="cpu-fp32", out=work / f"{tag}-fp32", measure_speed=False, eval_tokens=256)
    for name, (target, passes) in LLMOPT.items():
        if calib_source != "builtin":  # an untrained model without a tokenizer: calibrate on random ids
            passes = (passes or llmopt.core.registry.get_target(target).pipeline).replace("qdq{", "qdq{calibration=random,")
        t0 = time.perf_counter()
        art = llmopt.compile(hf, target=target, passes=passes, out=work / f"{tag}-{len(models)}", measure_speed=False,
                             verify_model=False, eval_tokens=256)
        print(f"{tag}: {name} compiled in {time.perf_counter() - t0:.1f}s", flush=True)
        models[f"llmopt {name}"] = art.model_path
    if ort:
        models.update(ort_tools(work, tag, fp32.model_path, calib_source))
    return models


def ort_tools(work: Path, tag: str, fused: Path, calib_source) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = {}
    d = work / f"{tag}-ort-dynamic" / "model.onnx"
    d.parent.mkdir()
    quantize_dynamic(str(fused), str(d), weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=True)
    out["onnxruntime quantize_dynamic (int8, per channel)"] = d

    model = llmopt.load(fused)
    batches = calibration.token_batches(calib_source, reference_model_dir(), 128, 16, verify.vocab_size(model))
    sess_inputs = {i.name: i for i in sessions.make_session(fused).get_inputs()}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            ids = next(self.it, None)
            return None if ids is None else pplx.prefill_feeds(sess_inputs, ids)

    s = work / f"{tag}-ort-static" / "model.onnx"
    s.parent.mkdir()
    quantize_static(str(fused), str(s), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    use_external_data_format=True)
    out["onnxruntime quantize_static (QDQ, MinMax)"] = s

    import onnx

    n = work / f"{tag}-ort-nbits" / "model.onnx"
    n.parent.mkdir()
    q = MatMulNBitsQuantizer(onnx.load(str(fused)), block_size=32, is_symmetric=False, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(n), use_external_data_format=True)
    out["onnxruntime MatMulNBitsQuantizer (4 bits, block 32)"] = n
    return out


def qat_models(work: Path) -> dict[str, Path]:
    """QAT on the reference (200 steps through the int4 block-32 grid, builtin calibration text),
    compiled with round-to-nearest (the grid it trained on) and, hybrid, with GPTQ on top, or with
    statically calibrated int8 activations (qdq, as the static int8 row)."""
    from llmopt.frontend import qat

    log = qat.finetune(reference_model_dir(), work / "ref-qat", qat.QATSettings(steps=200, batch=8, lr=2e-5))
    print(f"qat: {log['seconds']}s, loss {log['first_loss']:.3f} -> {log['last_loss']:.3f}", flush=True)
    out = {}
    for name, step in (("llmopt QAT (200 steps) + int4 block 32, round-to-nearest", "weight-only{bits=4,block_size=32,method=rtn}"),
                       ("llmopt hybrid: QAT weights + GPTQ, int4 block 32", "weight-only{bits=4,block_size=32,method=gptq}"),
                       ("llmopt hybrid: QAT weights + static QDQ (calibrated activations, percentile)",
                        "qdq{method=percentile,gather=true}")):
        art = llmopt.compile(work / "ref-qat", target="cpu-int4", out=work / f"ref-qat-{len(out)}", measure_speed=False,
                             verify_model=False, eval_tokens=256, passes=f"fold,cleanup,fuse,kv-cache,{step},cleanup")
        out[name] = art.model_path
    return out


def size(path: Path) -> int:
    return model_io.files_bytes(model_io.model_files(path))


def perplexities(models: dict[str, Path]) -> dict[str, float]:
    ref = reference_model_dir()
    ids = pplx.tokenize_file(pplx.load_tokenizer(ref), ref / "eval.txt")
    out = {}
    for name, path in models.items():
        out[name] = pplx.perplexity(sessions.make_session(path, threads=2), ids)
        print(f"ppl {name}: {out[name]['perplexity']:.3f}", flush=True)
    return out


def time_round_robin(paths: list[str], rounds: int) -> None:
    """Child: one decode step after 128 cached tokens, every model once per round; prints JSON."""
    runs, feeds = [], []
    for p in paths:
        runs.append(sessions.make_session(p, threads=2))
        m = llmopt.load(p)
        f = timing.decode_feeds(m, past=128)
        feeds.append({i.name: f[i.name] for i in runs[-1].get_inputs()})
    for s, f in zip(runs, feeds):  # warm up
        for _ in range(5):
            s.run(None, f)
    times = [[] for _ in paths]
    for _ in range(rounds):
        for i, (s, f) in enumerate(zip(runs, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - t0)
    base = np.array(times[0])
    print(json.dumps([{"ms": statistics.median(t) * 1e3, "speedup": float(np.median(base / np.array(t)))} for t in times]))


def speed(models: dict[str, Path], rounds: int) -> dict[str, dict]:
    names = list(models)
    res = subprocess.run([sys.executable, __file__, "--time", *map(str, models.values()), "--pairs", str(rounds)],
                         capture_output=True, text=True, check=True)
    return dict(zip(names, json.loads(res.stdout.strip().splitlines()[-1])))


KERNEL_VARIANTS = {
    "int8, block 128 (cpu-int8)": "fold,cleanup,fuse,kv-cache,quantize-dynamic,cleanup",
    "int4, block 32, zero points (cpu-int4)": "fold,cleanup,fuse,kv-cache,weight-only{bits=4,block_size=32},cleanup",
    "int4, block 32, symmetric": "fold,cleanup,fuse,kv-cache,weight-only{bits=4,block_size=32,symmetric=true},cleanup",
    "int4, block 128, zero points": "fold,cleanup,fuse,kv-cache,weight-only{bits=4,block_size=128},cleanup",
    "int4, block 32, fp32 compute (accuracy_level 0)": "fold,cleanup,fuse,kv-cache,weight-only{bits=4,block_size=32,accuracy_level=0},cleanup",
    "int8, block 32 (weight-only)": "fold,cleanup,fuse,kv-cache,weight-only{bits=8,block_size=32},cleanup",
}


def kernel_variants(work: Path, rounds: int, size: str = "50m") -> None:
    """MatMulNBits variants of the ~50M (or ~300M) Llama, round-robin; ratios against the first (cpu-int8)."""
    src = export(build("llama", work / f"hf-llama{size}", size=size), work / f"llama{size}.onnx", with_past=True)
    paths = [llmopt.compile(src, target="cpu-int8", passes=p, out=work / f"k{i}", measure_speed=False,
                            verify_model=False).model_path for i, p in enumerate(KERNEL_VARIANTS.values())]
    timed = speed(dict(zip(KERNEL_VARIANTS, paths)), rounds)
    print("\n| MatMulNBits variant | decode ms | speed vs cpu-int8 |\n|---|---|---|")
    for name, r in timed.items():
        print(f"| {name} | {r['ms']:.2f} | {r['speedup']:.2f}x |")


STATIC_VARIANTS = {
    "qdq, minmax": "qdq{method=minmax}",
    "qdq, percentile 99.99": "qdq{method=percentile}",
    "qdq, entropy": "qdq{method=entropy}",
    "smooth-quant alpha 0.5, qdq minmax": "smooth-quant{alpha=0.5},qdq{method=minmax}",
    "smooth-quant alpha 0.8, qdq minmax": "smooth-quant{alpha=0.8},qdq{method=minmax}",
    "smooth-quant alpha 0.5, qdq percentile": "smooth-quant{alpha=0.5},qdq{method=percentile}",
}


def static_variants(work: Path) -> None:
    """Static int8 on the reference: calibration method and SmoothQuant, perplexity on the whole eval text."""
    ref = reference_model_dir()
    models = {"fp32 (export)": export(ref, work / "ref.onnx", with_past=True)}
    for i, (name, passes) in enumerate(STATIC_VARIANTS.items()):
        models[name] = llmopt.compile(ref, target="cpu-int8", out=work / f"s{i}", measure_speed=False, verify_model=False,
                                      eval_tokens=256, passes=f"fold,cleanup,fuse,kv-cache,{passes},cleanup").model_path
    ppl = perplexities(models)
    base = ppl["fp32 (export)"]["perplexity"]
    print(f"\n| static int8 variant | perplexity ({ppl['fp32 (export)']['tokens']} tokens) | vs fp32 |\n|---|---|---|")
    for name, r in ppl.items():
        print(f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / base - 1:+.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=40, help="timing rounds")
    ap.add_argument("--out", type=Path, default=RESULTS / "quantization.json")
    ap.add_argument("--time", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--speed-only", action="store_true", help="only the 50M Llama speed column (prints a table)")
    ap.add_argument("--kernel-variants", action="store_true", help="int8 vs int4 MatMulNBits variants on the 50M Llama")
    ap.add_argument("--size", default="50m", choices=("50m", "300m"), help="--kernel-variants: the Llama's size")
    ap.add_argument("--static-variants", action="store_true", help="calibration methods and SmoothQuant for qdq, reference perplexity")
    ap.add_argument("--accuracy-only", action="store_true", help="llmopt's rows on the reference: size and perplexity, "
                    "no speed, no ONNX Runtime tools (add --qat for the QAT rows)")
    ap.add_argument("--qat", action="store_true", help="--accuracy-only: also the QAT rows (200 fine-tuning steps)")
    args = ap.parse_args()
    if args.time:
        return time_round_robin(args.time, args.pairs)
    result = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="llmopt-quant-") as tmp:
        work = Path(tmp)
        if args.kernel_variants:
            return kernel_variants(work, args.pairs, args.size)
        if args.static_variants:
            return static_variants(work)
        if args.accuracy_only:
            ref = build_models(work, reference_model_dir(), "ref", "builtin", ort=False)
            if args.qat:
                ref.update(qat_models(work))
            ppl, base = perplexities(ref), size(ref["fp32 (export)"])
            print(f"\n| model | size vs fp32 | perplexity ({ppl['fp32 (export)']['tokens']} tokens) | vs fp32 |\n|---|---|---|---|")
            for name, r in ppl.items():
                print(f"| {name} | {size(ref[name]) / base:.3f} | {r['perplexity']:.3f} | "
                      f"{r['perplexity'] / ppl['fp32 (export)']['perplexity'] - 1:+.2%} |")
            return
        if args.speed_only:
            big = build_models(work, build("llama", work / "hf-llama50m", size="50m"), "llama50m", "random")
            fast = speed(big, args.pairs)
            print("\n| model | decode ms, 50M Llama | decode speedup vs fp32 |\n|---|---|---|")
            for name, r in fast.items():
                print(f"| {name} | {r['ms']:.2f} | {r['speedup']:.2f}x |")
            return
        ref = build_models(work, reference_model_dir(), "ref", "builtin")
        ref.update(qat_models(work))
        ppl = perplexities(ref)
        big = build_models(work, build("llama", work / "hf-llama50m", size="50m"), "llama50m", "random")
        fast = speed(big, args.pairs)
        base_ppl, base_size = ppl["fp32 (export)"]["perplexity"], size(ref["fp32 (export)"])
        rows = {}
        for name in ref:
            rows[name] = {"size_ratio": size(ref[name]) / base_size, "perplexity": ppl[name]["perplexity"],
                          "perplexity_change": ppl[name]["perplexity"] / base_ppl - 1}
            if name in big:  # QAT rows are reference-only (same graph and speed as their post-training row)
                rows[name].update(size_ratio_50m=size(big[name]) / size(big["fp32 (export)"]),
                                  decode_ms_50m=fast[name]["ms"], decode_speedup_50m=fast[name]["speedup"])
        result.update(rows=rows, eval_tokens=ppl["fp32 (export)"]["tokens"], rounds=args.pairs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nmachine: {result['machine']}")
    print(f"\n| model | size vs fp32 (reference / 50M) | perplexity ({result['eval_tokens']} tokens) | vs fp32 | "
          "decode ms, 50M Llama | decode speedup vs fp32 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "decode_ms_50m" not in r:
            print(f"| {name} | {r['size_ratio']:.3f} / - | {r['perplexity']:.3f} | {r['perplexity_change']:+.2%} | "
                  "- | - |")  # QAT rows: the same graph, hence speed, as their post-training row
            continue
        print(f"| {name} | {r['size_ratio']:.3f} / {r['size_ratio_50m']:.3f} | {r['perplexity']:.3f} | "
              f"{r['perplexity_change']:+.2%} | {r['decode_ms_50m']:.2f} | {r['decode_speedup_50m']:.2f}x |")


if __name__ == "__main__":
    main()

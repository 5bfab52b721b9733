"""The numbers behind issue #2 (docs/benchmarks.md, "Compile spine").

    python benchmarks/spine.py [--pairs 30] [--out benchmarks/results/spine.json]

1. A ~50M-parameter Llama (random init, models/architectures.py "50m"), exported with KV-cache I/O,
   compiled to cpu-int8: artifact size vs the fp32 source, and single-token latency (after 128
   cached tokens) of source vs artifact in ONNX Runtime, A/B alternated, threads fixed at 2.
2. `llmopt inspect` on that model: wall time and peak RSS of the whole process vs the weights' size.
3. The trained reference model: perplexity of the fp32 export vs the cpu-int8 artifact on its
   held-out eval text (all of it).
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
from llmopt.ort import perplexity as pplx, timing  # noqa: E402
from llmopt.ort import sessions
from llmopt.core import graph_util  # noqa: E402
from llmopt.frontend.exporter import export, reference_model_dir  # noqa: E402
from llmopt.models.architectures import build  # noqa: E402

from _common import RESULTS, machine, peak_rss_of  # noqa: E402


def llama50m(work: Path, pairs: int) -> dict:
    hf = build("llama", work / "hf-llama50m", size="50m")
    src = export(hf, work / "llama50m.onnx", with_past=True)
    art = llmopt.compile(src, target="cpu-int8", out=work / "llama50m-int8", measure_speed=False)
    fp32 = llmopt.compile(src, target="cpu-fp32", out=work / "llama50m-fp32", measure_speed=False)
    model = llmopt.load(src)
    params = sum(p["count"] for p in graph_util.parameter_stats(model).values())
    # Time in a fresh process that holds only ONNX Runtime sessions (no torch, no export leftovers).
    out = subprocess.run([sys.executable, __file__, "--time", str(src), str(art.model_path), str(fp32.model_path),
                          "--pairs", str(pairs)], capture_output=True, text=True, check=True)
    lat, lat32 = json.loads(out.stdout.strip().splitlines()[-1])
    inspect_runs = [peak_rss_of([sys.executable, "-m", "llmopt", "inspect", str(src)]) for _ in range(5)]
    weights = graph_util.initializer_bytes(model)
    return {
        "parameters": params,
        "source_bytes": art.report["source"]["bytes"],
        "artifact_bytes": art.report["artifact"]["bytes"],
        "size_ratio": art.report["artifact"]["size_ratio"],
        "verification": art.report["verification"]["figures"],
        "latency": {"fp32_ms": lat["a_ms"], "int8_ms": lat["b_ms"], "speedup": lat["ratio"],
                    "speedup_min": lat["ratio_min"], "speedup_max": lat["ratio_max"], "pairs": pairs,
                    "threads": 2, "what": "1 new token after 128 cached, batch 1"},
        "latency_cpu_fp32": {"source_ms": lat32["a_ms"], "fp32_artifact_ms": lat32["b_ms"], "speedup": lat32["ratio"],
                             "speedup_min": lat32["ratio_min"], "speedup_max": lat32["ratio_max"], "pairs": pairs},
        "nodes": {"source": art.report["artifact"]["source_nodes"], "cpu-fp32": fp32.report["artifact"]["nodes"],
                  "cpu-int8": art.report["artifact"]["nodes"]},
        "pipeline": art.report["pipeline"],
        "inspect": {"seconds_median": statistics.median(w for w, _ in inspect_runs),
                    "peak_rss_bytes_max": max(r for _, r in inspect_runs), "weights_bytes": weights},
    }


def time_models(src: str, int8: str, fp32: str, pairs: int) -> None:
    """Child process: single-token latency, source vs each artifact, alternating pairs; prints JSON."""
    model = llmopt.load(src)
    feeds = timing.decode_feeds(model, past=128)
    a = sessions.make_session(src, threads=2)
    results = []
    for other in (int8, fp32):
        b = sessions.make_session(other, threads=2)
        results.append(timing.compare_sessions(a, b, feeds, pairs=pairs, warmup=5))
        del b
    print(json.dumps(results))


def reference(work: Path) -> dict:
    ref = reference_model_dir()
    art = llmopt.compile(ref, target="cpu-int8", out=work / "ref-int8", measure_speed=False)
    src = work / "ref.onnx"
    export(ref, src, with_past=True)
    ids = pplx.tokenize_file(pplx.load_tokenizer(ref), ref / "eval.txt")
    fp32 = pplx.perplexity(sessions.make_session(src, threads=2), ids)
    int8 = pplx.perplexity(sessions.make_session(art.model_path, threads=2), ids)
    return {"tokens": fp32["tokens"], "fp32_perplexity": fp32["perplexity"], "int8_perplexity": int8["perplexity"],
            "change": int8["perplexity"] / fp32["perplexity"] - 1, "size_ratio": art.report["artifact"]["size_ratio"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS / "spine.json")
    ap.add_argument("--time", nargs=3, metavar=("SOURCE", "INT8", "FP32"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time:
        return time_models(*args.time, args.pairs)
    with tempfile.TemporaryDirectory(prefix="llmopt-bench-") as tmp:
        work = Path(tmp)
        result = {"machine": machine(), "llama50m": llama50m(work, args.pairs), "reference": reference(work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    m, r = result["llama50m"], result["reference"]
    lat = m["latency"]
    print(f"machine: {result['machine']}")
    print("| model | metric | value |\n|---|---|---|")
    print(f"| Llama {m['parameters'] / 1e6:.1f}M | cpu-int8 size / fp32 | {m['size_ratio']:.3f} |")
    print(f"| Llama {m['parameters'] / 1e6:.1f}M | single-token speedup int8 vs fp32 (median of {lat['pairs']} pairs) | "
          f"{lat['speedup']:.2f}x (range {lat['speedup_min']:.2f}-{lat['speedup_max']:.2f}; {lat['fp32_ms']:.1f} vs {lat['int8_ms']:.1f} ms) |")
    l32 = m["latency_cpu_fp32"]
    print(f"| Llama {m['parameters'] / 1e6:.1f}M | single-token speedup cpu-fp32 artifact vs fp32 source | "
          f"{l32['speedup']:.2f}x (range {l32['speedup_min']:.2f}-{l32['speedup_max']:.2f}) |")
    print(f"| Llama {m['parameters'] / 1e6:.1f}M | nodes source / cpu-fp32 / cpu-int8 | "
          f"{m['nodes']['source']} / {m['nodes']['cpu-fp32']} / {m['nodes']['cpu-int8']} |")
    print(f"| Llama {m['parameters'] / 1e6:.1f}M | `llmopt inspect` wall (median of 5) / peak RSS / weights | "
          f"{m['inspect']['seconds_median']:.2f} s / {m['inspect']['peak_rss_bytes_max'] / 2**20:.0f} MiB / {m['inspect']['weights_bytes'] / 2**20:.0f} MiB |")
    print(f"| reference | perplexity fp32 -> cpu-int8 ({r['tokens']} tokens) | {r['fp32_perplexity']:.3f} -> "
          f"{r['int8_perplexity']:.3f} ({r['change']:+.2%}) |")


if __name__ == "__main__":
    main()

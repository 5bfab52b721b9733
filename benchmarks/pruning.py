"""Pruning (issue #6; docs/benchmarks.md, "Pruning").

    python benchmarks/pruning.py [--pairs 60] [--out benchmarks/results/pruning.json]

1. The trained reference model: perplexity on its whole held-out eval text after `prune` at 10/30/50%
   unstructured (magnitude and Wanda), 2:4 (both), and 25% structured FFN channels (both), each
   against the dense model, all compiled for cpu-fp32. Wanda calibrates on `calibration=builtin`
   (training chapters, never the eval text).
2. The ~50M Llama: parameter count and single-token latency (after 128 cached tokens, 2 threads) of
   the cpu-fp32 artifact with 25% of its FFN channels removed vs the dense one, alternated in one
   fresh process, median of per-pair ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llmopt  # noqa: E402
from llmopt.ort import perplexity as pplx, timing  # noqa: E402
from llmopt.ort import sessions
from llmopt.core import graph_util  # noqa: E402
from llmopt.frontend.exporter import reference_model_dir  # noqa: E402
from llmopt.models.architectures import build  # noqa: E402

from _common import RESULTS, machine  # noqa: E402

VARIANTS = {"dense": None}
for method in ("magnitude", "wanda"):
    for sparsity in (0.1, 0.3, 0.5):
        VARIANTS[f"{method} {sparsity:.0%} unstructured"] = f"prune{{method={method},sparsity={sparsity}}}"
    VARIANTS[f"{method} 2:4"] = f"prune{{method={method},pattern=2:4}}"
    VARIANTS[f"{method} 25% FFN channels"] = f"prune-ffn{{method={method},ratio=0.25}}"


def pipeline(prune: str | None) -> str:
    return "fold,cleanup,fuse," + (f"{prune}," if prune else "") + "kv-cache,cleanup"


def reference(work: Path) -> dict:
    ref = reference_model_dir()
    ids = pplx.tokenize_file(pplx.load_tokenizer(ref), ref / "eval.txt")
    rows = {}
    for i, (name, prune) in enumerate(VARIANTS.items()):
        art = llmopt.compile(ref, target="cpu-fp32", passes=pipeline(prune), out=work / f"ref{i}", measure_speed=False,
                             verify_model=False, eval_tokens=256)
        ppl = pplx.perplexity(sessions.make_session(art.model_path, threads=2), ids)
        params = sum(p["count"] for p in graph_util.parameter_stats(llmopt.load(art.model_path)).values())
        rows[name] = {"perplexity": ppl["perplexity"], "parameters": params, "sparsity": art.report.get("sparsity")}
        print(name, round(ppl["perplexity"], 3), params, flush=True)
    base = rows["dense"]["perplexity"]
    for r in rows.values():
        r["change"] = r["perplexity"] / base - 1
    return {"rows": rows, "tokens": ppl["tokens"]}


def structured_speed(work: Path, pairs: int) -> dict:
    hf = build("llama", work / "hf-llama50m", size="50m")
    dense = llmopt.compile(hf, target="cpu-fp32", out=work / "d50", measure_speed=False, verify_model=False)
    pruned = llmopt.compile(hf, target="cpu-fp32", out=work / "p50", measure_speed=False, verify_model=False,
                            passes=pipeline("prune-ffn{ratio=0.25}"))
    res = subprocess.run([sys.executable, __file__, "--time", str(dense.model_path), str(pruned.model_path),
                          "--pairs", str(pairs)], capture_output=True, text=True, check=True)
    count = lambda p: sum(s["count"] for s in graph_util.parameter_stats(llmopt.load(p)).values())  # noqa: E731
    return {"dense_parameters": count(dense.model_path), "pruned_parameters": count(pruned.model_path),
            **json.loads(res.stdout.strip().splitlines()[-1]), "pairs": pairs}


def time_pair(dense: str, pruned: str, pairs: int) -> None:
    a, b = sessions.make_session(dense, threads=2), sessions.make_session(pruned, threads=2)
    feeds = timing.decode_feeds(llmopt.load(dense), past=128)
    print(json.dumps(timing.compare_sessions(a, b, feeds, pairs=pairs, warmup=5)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--out", type=Path, default=RESULTS / "pruning.json")
    ap.add_argument("--time", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time:
        return time_pair(*args.time, args.pairs)
    with tempfile.TemporaryDirectory(prefix="llmopt-prune-") as tmp:
        work = Path(tmp)
        result = {"machine": machine(), "reference": reference(work), "structured_50m": structured_speed(work, args.pairs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    r = result["reference"]
    print(f"\n| pruning | perplexity ({r['tokens']} tokens) | vs dense | parameters |\n|---|---|---|---|")
    for name, row in r["rows"].items():
        print(f"| {name} | {row['perplexity']:.3f} | {row['change']:+.2%} | {row['parameters'] / 1e6:.3f}M |")
    s = result["structured_50m"]
    print(f"\n~50M Llama, 25% FFN channels removed: parameters {s['dense_parameters'] / 1e6:.1f}M -> "
          f"{s['pruned_parameters'] / 1e6:.1f}M; single-token latency {s['a_ms']:.2f} -> {s['b_ms']:.2f} ms, "
          f"speedup {s['ratio']:.2f}x (median of {s['pairs']} pairs, range {s['ratio_min']:.2f}-{s['ratio_max']:.2f})")


if __name__ == "__main__":
    main()

"""Fusion coverage and speed (issue #3): llmopt's `fuse` vs ONNX Runtime's transformers optimizer
vs onnxscript's `optimize_for_ort`, on torch.onnx (dynamo) exports of every architecture.

    python benchmarks/fusion.py [--out benchmarks/results/fusion.json] [--pairs 40] [--no-speed]

Each architecture is built from its tiny config (random init) at 2 and 4 layers and exported with
KV-cache I/O. Nodes per layer = (nodes at 4 layers - nodes at 2 layers) / 2, so the fixed
embedding/mask/head part does not blur the per-layer density. Every optimized graph is run in
ONNX Runtime against the export (max-abs logits error) so a count only stands for a graph that
still computes the same thing.

Speed: the ~50M-parameter Llama ("50m" config) exported with KV-cache I/O; the unoptimized export,
ONNX Runtime's optimizer output and llmopt's cpu-fp32 artifact, timed in a fresh child process at
2 threads (ORT's default session optimizations on for all three): prefill (batch 1, 128 tokens)
and one new token after 128 cached, each pair of models alternated, medians and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llmopt  # noqa: E402
from llmopt.core import model_io, graph_util  # noqa: E402
from llmopt.ort import verify  # noqa: E402
from llmopt.ort import sessions
from llmopt.core.manager import run_pipeline  # noqa: E402
from llmopt.models.architectures import ARCHITECTURES, config  # noqa: E402

from _common import RESULTS, machine  # noqa: E402

ORT_MODEL_TYPE = {"gpt2": "gpt2", "phi3": "gpt2"}  # decoders without a dedicated type use gpt2's
GROUPS = {
    "attention": {"MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedMultiHeadAttention"},
    "norm": {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "RMSNormalization"},
    "rotary": {"RotaryEmbedding"},
}


def export_arch(arch: str, layers: int, work: Path, with_past: bool) -> Path:
    from llmopt.frontend.exporter import export
    from llmopt.models.architectures import build

    d = work / f"{arch}-{layers}"
    if not d.exists():
        build(arch, d, layers=layers)
    return export(d, work / f"{arch}-{layers}{'-past' if with_past else ''}.onnx", with_past=with_past)


def counts(model) -> dict:
    ops = Counter(n.op_type for n in model.graph)
    out = {g: sum(ops[o] for o in names) for g, names in GROUPS.items()}
    out["rotary_in_gqa"] = sum(1 for n in model.graph if n.op_type == "GroupQueryAttention"
                               and n.attributes.get("do_rotary") is not None and n.attributes["do_rotary"].as_int())
    out["nodes"] = sum(ops.values())
    return out


def llmopt_fuse(src: Path, dst: Path):
    m = llmopt.load(src)
    run_pipeline(m, "fold,cleanup,fuse,cleanup")
    model_io.save(m, dst)
    return m


def onnxscript_fuse(src: Path, dst: Path):
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    m = llmopt.load(src)
    optimize_for_ort(m)
    model_io.save(m, dst)
    return m


def ort_fuse(src: Path, dst: Path, arch: str, size: str = "tiny"):
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = config(arch, size)
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    opt = optimize_model(str(src), model_type=ORT_MODEL_TYPE.get(arch, "gpt2"), num_heads=heads, hidden_size=hidden)
    opt.save_model_to_file(str(dst), use_external_data_format=True)
    return llmopt.load(dst)


def max_abs(src: Path, dst: Path) -> float:
    model = llmopt.load(src)
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(verify.has_past_inputs(model)))]
    ref = sessions.run_path(src, feeds)
    try:
        got = sessions.run_path(dst, feeds)
    except Exception as exc:  # a tool's output that ORT cannot load or run
        return f"ORT fails: {str(exc).splitlines()[0][:120]}"
    return max(verify.compare(r, g).max_abs for r, g in zip(ref, got))


def speed(work: Path, pairs: int) -> dict:
    import subprocess

    from llmopt.frontend.exporter import export
    from llmopt.models.architectures import build

    src = export(build("llama", work / "hf-llama50m", size="50m"), work / "llama50m.onnx", with_past=True)
    art = llmopt.compile(src, target="cpu-fp32", out=work / "llama50m-fp32", measure_speed=False)
    ort_dir = work / "llama50m-ort"
    ort_dir.mkdir()
    ort_fuse(src, ort_dir / "model.onnx", "llama", size="50m")
    silu = llmopt.compile(src, target="cpu-fp32", out=work / "llama50m-fp32-silu", measure_speed=False,
                          passes="fold,cleanup,fuse{silu=true},kv-cache,cleanup")
    out = subprocess.run([sys.executable, __file__, "--time", str(src), str(ort_dir / "model.onnx"), str(art.model_path),
                          str(silu.model_path), "--pairs", str(pairs)], capture_output=True, text=True, check=True)
    timings = json.loads(out.stdout.strip().splitlines()[-1])
    nodes = {"export": graph_util.node_count(llmopt.load(src)), "onnxruntime": graph_util.node_count(llmopt.load(ort_dir / "model.onnx")),
             "llmopt": art.report["artifact"]["nodes"]}
    return {"timings": timings, "nodes": nodes, "verification": art.report["verification"]["figures"], "pairs": pairs}


def time_models(src: str, ort_path: str, ours: str, silu: str, pairs: int) -> None:
    """Child process: llmopt's artifact against each other model, prefill and decode; prints JSON."""
    from llmopt.ort import timing

    model = llmopt.load(src)
    steps = {"prefill 128 tokens": verify.sample_inputs(model, verify.SampleShape(1, 128, 0), seed=7),
             "1 token after 128": verify.sample_inputs(model, verify.SampleShape(1, 1, 128), seed=7)}
    mine = sessions.make_session(ours, threads=2)
    results = {}
    for label, other in (("export", src), ("onnxruntime", ort_path), ("llmopt fuse{silu=true} (QuickGelu)", silu)):
        sess = sessions.make_session(other, threads=2)
        for step, feeds in steps.items():
            results[f"{label} | {step}"] = timing.compare_sessions(sess, mine, feeds, pairs=pairs, warmup=5)
        del sess
    print(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "fusion.json")
    ap.add_argument("--arch", nargs="*", default=list(ARCHITECTURES))
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="skip the coverage table")
    ap.add_argument("--time", nargs=4, metavar=("SOURCE", "ORT", "LLMOPT", "SILU"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time:
        return time_models(*args.time, args.pairs)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="llmopt-fusion-") as tmp:
        work = Path(tmp)
        for arch, with_past in ((a, p) for a in ([] if args.speed_only else args.arch) for p in (True, False)):
            name = arch if with_past else f"{arch} (no cache)"
            arch_work = work / name.replace(" ", "_").replace("(", "").replace(")", "")
            arch_work.mkdir()
            rows[name] = {}
            src = {L: export_arch(arch, L, work, with_past) for L in (2, 4)}
            rows[name]["export"] = {L: counts(llmopt.load(src[L])) for L in (2, 4)}
            tools = {"llmopt": lambda s, d: llmopt_fuse(s, d), "onnxscript": lambda s, d: onnxscript_fuse(s, d),
                     "onnxruntime": lambda s, d, a=arch: ort_fuse(s, d, a)}
            for tool, fn in tools.items():
                entry = {}
                for L in (2, 4):
                    dst = arch_work / f"{L}-{tool}" / "model.onnx"
                    dst.parent.mkdir()
                    try:
                        entry[L] = counts(fn(src[L], dst))
                        entry[L]["max_abs"] = max_abs(src[L], dst)
                    except Exception as exc:  # report a tool that fails instead of hiding the row
                        entry[L] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                rows[name][tool] = entry
            print(arch, json.dumps({t: rows[name][t].get(4) for t in rows[name]}), flush=True)
        speed_result = None if args.no_speed else speed(work, args.pairs)
    result = {"machine": machine(), "rows": rows, "speed": speed_result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print("\n| arch | tool | nodes/layer | attention | norms | rotary (+ in GQA) | max-abs vs export |")
    print("|---|---|---|---|---|---|---|")
    for arch, r in rows.items():
        for tool in ("export", "onnxruntime", "onnxscript", "llmopt"):
            e = r[tool]
            if "error" in e.get(4, {}) or "error" in e.get(2, {}):
                print(f"| {arch} | {tool} | failed: {(e.get(4) or e.get(2))['error']} | | | | |")
                continue
            per_layer = (e[4]["nodes"] - e[2]["nodes"]) / 2
            err = e[4].get("max_abs", "-")
            err = f"{err:.1e}" if isinstance(err, float) else ("ORT cannot run it" if err != "-" else err)
            print(f"| {arch} | {tool} | {per_layer:.1f} | {e[4]['attention']} | {e[4]['norm']} | "
                  f"{e[4]['rotary']} (+{e[4]['rotary_in_gqa']}) | {err} |")

    if speed_result:
        print(f"\nSpeed, Llama ~50M, {speed_result['pairs']} alternating pairs each, 2 threads "
              f"(ratio = other model's time / llmopt cpu-fp32's time):")
        print("| baseline | step | baseline ms | llmopt ms | speedup (median) | range |")
        print("|---|---|---|---|---|---|")
        for key, t in speed_result["timings"].items():
            base, step = key.split(" | ")
            print(f"| {base} | {step} | {t['a_ms']:.2f} | {t['b_ms']:.2f} | {t['ratio']:.2f}x | "
                  f"{t['ratio_min']:.2f}-{t['ratio_max']:.2f} |")
        print("nodes:", speed_result["nodes"])


if __name__ == "__main__":
    main()

"""Fusion coverage (issue #3): llmopt's `fuse` vs ONNX Runtime's transformers optimizer vs
onnxscript's `optimize_for_ort`, on torch.onnx (dynamo) exports of every architecture.

    python benchmarks/fusion.py [--out benchmarks/results/fusion.json]

Each architecture is built from its tiny config (random init) at 2 and 4 layers and exported with
KV-cache I/O. Nodes per layer = (nodes at 4 layers - nodes at 2 layers) / 2, so the fixed
embedding/mask/head part does not blur the per-layer density. Every optimized graph is run in
ONNX Runtime against the export (max-abs logits error) so a count only stands for a graph that
still computes the same thing.
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
from llmopt import ir as irx  # noqa: E402
from llmopt import verify  # noqa: E402
from llmopt.manager import run_pipeline  # noqa: E402
from llmopt.models.architectures import ARCHITECTURES, config  # noqa: E402

from _common import RESULTS, machine  # noqa: E402

ORT_MODEL_TYPE = {"gpt2": "gpt2", "phi3": "gpt2"}  # decoders without a dedicated type use gpt2's
GROUPS = {
    "attention": {"MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedMultiHeadAttention"},
    "norm": {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
             "SkipLayerNormalization", "RMSNormalization"},
    "rotary": {"RotaryEmbedding"},
}


def export_arch(arch: str, layers: int, work: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from llmopt.export import export

    cfg = config(arch, layers=layers)
    torch.manual_seed(0)
    d = work / f"{arch}-{layers}"
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
    return export(d, work / f"{arch}-{layers}.onnx", with_past=True)


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
    irx.save(m, dst)
    return m


def onnxscript_fuse(src: Path, dst: Path):
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    m = llmopt.load(src)
    optimize_for_ort(m)
    irx.save(m, dst)
    return m


def ort_fuse(src: Path, dst: Path, arch: str):
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = config(arch)
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    opt = optimize_model(str(src), model_type=ORT_MODEL_TYPE.get(arch, "gpt2"), num_heads=heads, hidden_size=hidden)
    opt.save_model_to_file(str(dst), use_external_data_format=True)
    return llmopt.load(dst)


def max_abs(src: Path, dst: Path) -> float:
    model = llmopt.load(src)
    feeds = [verify.sample_inputs(model, s, i) for i, s in enumerate(verify.default_shapes(True))]
    ref = verify.run_path(src, feeds)
    try:
        got = verify.run_path(dst, feeds)
    except Exception as exc:  # a tool's output that ORT cannot load or run
        return f"ORT fails: {str(exc).splitlines()[0][:120]}"
    return max(verify.compare(r, g).max_abs for r, g in zip(ref, got))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "fusion.json")
    ap.add_argument("--arch", nargs="*", default=list(ARCHITECTURES))
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="llmopt-fusion-") as tmp:
        work = Path(tmp)
        for arch in args.arch:
            rows[arch] = {}
            src = {L: export_arch(arch, L, work) for L in (2, 4)}
            rows[arch]["export"] = {L: counts(llmopt.load(src[L])) for L in (2, 4)}
            tools = {"llmopt": lambda s, d: llmopt_fuse(s, d), "onnxscript": lambda s, d: onnxscript_fuse(s, d),
                     "onnxruntime": lambda s, d, a=arch: ort_fuse(s, d, a)}
            for tool, fn in tools.items():
                entry = {}
                for L in (2, 4):
                    dst = work / f"{arch}-{L}-{tool}" / "model.onnx"
                    dst.parent.mkdir()
                    try:
                        entry[L] = counts(fn(src[L], dst))
                        entry[L]["max_abs"] = max_abs(src[L], dst)
                    except Exception as exc:  # report a tool that fails instead of hiding the row
                        entry[L] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                rows[arch][tool] = entry
            print(arch, json.dumps({t: rows[arch][t].get(4) for t in rows[arch]}), flush=True)
    result = {"machine": machine(), "rows": rows}
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


if __name__ == "__main__":
    main()

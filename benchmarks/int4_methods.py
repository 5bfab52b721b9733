"""Which int4 recipe (issue 16; docs/benchmarks.md, "int4: methods compared").

    python benchmarks/int4_methods.py [--rounds 5] [--no-speed]

Two trained models, so the choice is not fitted to one:

- the reference model (``models/reference``: Llama, 4 layers, hidden 256, BPE vocabulary 4096 —
  embeddings and lm_head are 43% of its weights);
- a byte-level Llama (vocabulary 260, 6 layers, hidden 384, 9.6M parameters — nearly all of them
  in the layers' MatMuls), trained by ``tools/train_reference.py`` on the same KJV chapters
  (14 minutes; built on first run under ``--work``).

Each recipe compiles the model's Hugging Face directory with cpu-int4's pipeline and a different
``weight-only`` step; perplexity is measured on the model's whole held-out text. ONNX Runtime's
own ``MatMulNBitsQuantizer`` (4 bits, block 32, zero points, the defaults people run) is applied to
llmopt's cpu-fp32 artifact of the same model, so only the quantization differs. Size: model files.
Decode tok/s depends on the layout only (not on how the integers were chosen), so it is measured
on the ~50M random Llama of ``benchmarks/peer.py`` compiled with each recipe's layout, 64 cached
tokens, 100 new, batch 1, 2 threads, all recipes alternated for ``--rounds`` rounds (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import llmopt  # noqa: E402
from llmopt.core import model_io  # noqa: E402
from llmopt.frontend.exporter import reference_model_dir  # noqa: E402
from llmopt.ort import perplexity as pplx  # noqa: E402
from llmopt.ort import sessions  # noqa: E402

from _common import RESULTS, machine, round_robin  # noqa: E402

HEAD = "fold,cleanup,fuse,kv-cache,logits-to-keep,"
RECIPES = {  # name -> weight-only options (None: the ORT tool)
    "onnxruntime MatMulNBitsQuantizer (block 32)": None,
    "round to nearest, block 32": "method=rtn",
    "GPTQ, block 32 (cpu-int4 before)": "method=gptq",
    "GPTQ + range search, block 32": "method=gptq,scales=search",
    "GPTQ + range search + 8-bit tables (cpu-int4)": "method=gptq,scales=search,table_bits=8",
    "... + 8-bit lm_head": "method=gptq,scales=search,table_bits=8,head_bits=8",
    "GPTQ + range search + 8-bit tables, block 128": "method=gptq,scales=search,table_bits=8,block_size=128",
}
BYTES_MODEL = ["--minutes", "14", "--vocab-size", "260", "--hidden", "384", "--layers", "6", "--heads", "6",
               "--kv-heads", "2", "--intermediate", "1024", "--seq-len", "512", "--max-weights-mb", "60"]


def _pipeline(options: str) -> str:
    opts = dict(kv.split("=") for kv in f"bits=4,block_size=32,accuracy_level=4,{options}".split(","))
    return HEAD + "weight-only{" + ",".join(f"{k}={v}" for k, v in opts.items()) + "},cleanup"


def _bytes_model(work: Path) -> Path:
    hf = work / "trained-bytes"
    if not (hf / "model.safetensors").is_file():
        repo = Path(__file__).resolve().parent.parent
        subprocess.run([sys.executable, str(repo / "tools" / "train_reference.py"), "--out", str(hf), *BYTES_MODEL], check=True)
    return hf


def _ort_nbits(fp32_artifact: Path, out: Path) -> Path:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger().setLevel(logging.WARNING)  # the tool sets the root logger to INFO

    target = out / "model.onnx"
    if not target.is_file():
        out.mkdir(parents=True, exist_ok=True)
        q = MatMulNBitsQuantizer(onnx.load(str(model_io.resolve_model_file(fp32_artifact))), block_size=32,
                                 is_symmetric=False, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(target), use_external_data_format=True)
    return target


def accuracy(name: str, hf: Path, work: Path) -> dict:
    ids = pplx.tokenize_file(pplx.load_tokenizer(hf), hf / "eval.txt")
    fp32 = work / f"{name}-fp32"
    if not (fp32 / "llmopt.json").is_file():
        llmopt.compile(hf, target="cpu-fp32", out=fp32, measure_speed=False)
    models = {"fp32 (cpu-fp32)": model_io.resolve_model_file(fp32)}
    for i, (recipe, options) in enumerate(RECIPES.items()):
        out = work / f"{name}-r{i}"
        if options is None:
            models[recipe] = _ort_nbits(fp32, out)
            continue
        if not (out / "llmopt.json").is_file() or json.loads((out / "llmopt.json").read_text())["pipeline"] != _pipeline(options):
            # verification on: every recipe must pass cpu-int4's accuracy budget
            llmopt.compile(hf, target="cpu-int4", out=out, passes=_pipeline(options), measure_speed=False)
        models[recipe] = model_io.resolve_model_file(out)
    rows = {}
    for recipe, path in models.items():
        r = pplx.perplexity(sessions.make_session(path, threads=2), ids)
        rows[recipe] = {"perplexity": r["perplexity"], "bytes": model_io.files_bytes(model_io.model_files(path))}
        print(f"{name}: {recipe}: ppl {r['perplexity']:.4f}", flush=True)
    base = rows["fp32 (cpu-fp32)"]
    for row in rows.values():
        row["perplexity_change"] = row["perplexity"] / base["perplexity"] - 1
        row["size_vs_fp32"] = row["bytes"] / base["bytes"]
    return {"eval_tokens": int(ids.size), "rows": rows}


def speed(rounds: int, root: Path) -> dict:
    """Decode and prefill tok/s of each recipe's layout on the ~50M Llama (peer.py's)."""
    import peer
    from llmopt.ort.generation import Generator

    p = peer.prepare("50m", root, targets={"cpu-int4": None})
    gens = {}
    for i, (recipe, options) in enumerate(RECIPES.items()):
        if options is None:
            continue
        out = peer.work_dir("50m", root) / f"recipe-{i}"
        layout = options.replace("method=gptq", "method=rtn")  # the random model has no calibration text; same layout
        if not (out / "llmopt.json").is_file() or json.loads((out / "llmopt.json").read_text())["pipeline"] != _pipeline(layout):
            llmopt.compile(p["source"], target="cpu-int4", out=out, passes=_pipeline(layout), measure_speed=False, verify_model=False)
        gens[recipe] = Generator(out, threads=peer.THREADS)
    runs = round_robin(gens, rounds)
    return {k: {key: statistics.median(x[key] for x in v) for key in ("decode_tokens_per_s", "prefill_tokens_per_s")}
            for k, v in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "llmopt-bench" / "int4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "int4-methods.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = {"machine": machine(), "recipes": {k: (_pipeline(v) if v else "MatMulNBitsQuantizer(block_size=32, is_symmetric=False, accuracy_level=4) on cpu-fp32's graph") for k, v in RECIPES.items()},
              "models": {"reference": accuracy("reference", reference_model_dir(), args.work),
                         "byte-level": accuracy("bytes", _bytes_model(args.work), args.work)}}
    if not args.no_speed:
        result["speed_50m"] = speed(args.rounds, args.work.parent / "peer")
    result["seconds"] = round(time.time() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

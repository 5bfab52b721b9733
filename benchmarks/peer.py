"""llmopt next to llama.cpp on the same weights (issue 16; docs/benchmarks.md, "Side by side with llama.cpp").

    python benchmarks/peer.py prepare --size 50m|1b          # HF dir, export, artifacts, GGUFs (cached)
    python benchmarks/peer.py speed --size 50m --rounds 3    # batch 1: prefill and decode tok/s
    python benchmarks/peer.py batch --size 50m --rounds 3    # BLOOM form at batch 1, 8, 32
    python benchmarks/peer.py logits --size 50m --rounds 10  # prefill with / without logits-to-keep

Models: random-weight Llamas from ``models.architectures.LLAMA_SIZES`` — ``50m`` (~201 MB fp32,
fits a large last-level cache) and ``1b`` (TinyLlama-1.1B's shape, 4.4 GB fp32, memory-bound).
llmopt's side: the Hugging Face directory exported with a KV cache (``llmopt export``) and compiled
to ``cpu-int8`` and ``cpu-int4`` with the targets' default pipelines (unverified: random weights
miss the int4 cosine budget; the agreement with the export is measured and reported instead).
llama.cpp's side (built by ``benchmarks/llamacpp.py``): the same directory through its
``convert_hf_to_gguf.py`` (a synthetic tokenizer added), quantized to Q8_0 and Q4_0.

``speed``: a 64-token prompt then 100 new tokens at batch 1, 2 threads. llmopt: its generation
loop; prefill tok/s = 64 / prefill seconds, decode tok/s = 99 decode steps / their seconds.
llama.cpp: ``llama-bench -p 64 -n 0`` and ``-p 0 -n 100 -d 64`` (decode after 64 tokens of
context). ``batch``: the throughput form of Hugging Face's BLOOM inference benchmark — time to
generate 100 new tokens after a 64-token prompt (prefill included) / 100 / batch — at batch 1, 8
and 32. llama.cpp: ``llama-batched-bench -npp 64 -ntg 100 -npl B`` (its ``T`` column: prompt
processing plus generation of all B sequences). Every round runs every contender once,
alternately; tables give medians, ratios are medians of per-round ratios. Keep the machine quiet.

``speed`` also gives the roofline: the bytes a batch-1 decode step reads (``llmopt bench``'s count:
every weight but the embedding rows not looked up) over the read bandwidth ``llmopt bench`` probes
(numpy sums of a 1 GiB buffer by 2, 4 and 8 threads, best of 5), with the numpy and a plain C
streaming read at each thread count beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import llmopt  # noqa: E402
from llmopt.core import model_io  # noqa: E402
from llmopt.core.registry import get_target  # noqa: E402
from llmopt.frontend.exporter import export  # noqa: E402
from llmopt.models.architectures import build  # noqa: E402
from llmopt.ort.generation import Generator  # noqa: E402

from _common import NEW, PROMPT, RESULTS, agreement, generation_speed, machine, round_robin  # noqa: E402

THREADS = 2
TARGETS = {"cpu-int8": "Q8_0", "cpu-int4": "Q4_0"}  # llmopt target -> the llama.cpp type it faces
DISK_NEEDED = {"50m": 2e9, "1b": 24e9}


def work_dir(size: str, root: Path) -> Path:
    return root / size


def prepare(size: str, root: Path, targets: dict[str, str] | None = None) -> dict:
    """HF directory, export, one artifact per target, GGUFs. Each step is skipped when its output exists."""
    import llamacpp

    targets = targets or {t: None for t in TARGETS}
    work = work_dir(size, root)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < DISK_NEEDED[size] and not (work / "gguf-q4_0.gguf").is_file():
        sys.exit(f"peer.py: {work} has {free / 1e9:.0f} GB free; the {size} model needs ~{DISK_NEEDED[size] / 1e9:.0f} GB")
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        t0 = time.time()
        build("llama", hf, size=size)
        print(f"built {hf} in {time.time() - t0:.0f}s", flush=True)
    src = work / "model.onnx"
    if not src.is_file():
        t0 = time.time()
        export(hf, src, with_past=True)
        print(f"exported in {time.time() - t0:.0f}s", flush=True)
    arts = {}
    for target, passes in targets.items():
        out = work / target
        want = passes or get_target(target).pipeline
        have = json.loads((out / "llmopt.json").read_text())["pipeline"] if (out / "llmopt.json").is_file() else None
        if have != want:  # missing, or built by another pipeline (the target's default changed)
            t0 = time.time()
            llmopt.compile(src, target=target, out=out, passes=passes, measure_speed=False, verify_model=False)
            print(f"compiled {target} in {time.time() - t0:.0f}s", flush=True)
        arts[target] = out
    llamacpp.build()
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    tok = llamacpp.with_tokenizer(hf, work / "hf-tok", vocab_size=vocab)
    f16 = llamacpp.convert(tok, work / "gguf-f16.gguf", "f16")  # Q8_0/Q4_0 from f16: what users do
    ggufs = {kind: llamacpp.quantize(f16, work / f"gguf-{kind.lower()}.gguf", kind) for kind in TARGETS.values()}
    return {"hf": hf, "source": src, "artifacts": arts, "ggufs": ggufs}


def _prompts(batch: int, seed: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(10, 1000, size=(batch, PROMPT)).tolist()


def llmopt_batch(gen: Generator, batch: int, seed: int) -> dict:
    t0 = time.perf_counter()
    gen.generate(_prompts(batch, seed), NEW, eos_token_id=-1)
    return {"ms_per_token": (time.perf_counter() - t0) * 1e3 / NEW / batch}


def peer_batch(gguf: Path, batch: int) -> dict:
    """``llama-batched-bench``: prompt + 100 new tokens for ``batch`` parallel sequences."""
    import llamacpp

    ctx = batch * (PROMPT + NEW) + 16
    out = subprocess.run([str(llamacpp.build() / "llama-batched-bench"), "-m", str(gguf), "-t", str(THREADS),
                          "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(PROMPT), "-ntg", str(NEW),
                          "-npl", str(batch), "--output-format", "jsonl"],
                         check=True, capture_output=True, text=True).stdout
    row = [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]
    return {"ms_per_token": row["t"] * 1e3 / NEW / batch, "raw": row}


C_READ = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef struct { const uint64_t *p; size_t n; uint64_t r; } job;
static void *run(void *a) { job *j = a; uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = 0; i + 3 < j->n; i += 4) { s0 += j->p[i]; s1 += j->p[i+1]; s2 += j->p[i+2]; s3 += j->p[i+3]; }
  j->r = s0 ^ s1 ^ s2 ^ s3; return 0; }
int main(int argc, char **argv) { int T = atoi(argv[1]); size_t bytes = (size_t)atoi(argv[2]) << 20;
  uint64_t *b = aligned_alloc(64, bytes); memset(b, 1, bytes); size_t n = bytes / 8; double best = 0;
  for (int r = 0; r < 5; r++) { pthread_t t[64]; job j[64]; struct timespec a, z; clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < T; i++) { j[i].p = b + n / T * i; j[i].n = n / T; pthread_create(&t[i], 0, run, &j[i]); }
    for (int i = 0; i < T; i++) pthread_join(t[i], 0);
    clock_gettime(CLOCK_MONOTONIC, &z); double s = (z.tv_sec - a.tv_sec) + (z.tv_nsec - a.tv_nsec) * 1e-9;
    if (bytes / s > best) best = bytes / s; }
  printf("%.3f\n", best / 1e9); return 0; }
"""


def bandwidth_probes(threads: int = THREADS) -> dict:
    """llmopt bench's probe (numpy) at each thread count it tries, and a plain C streaming read
    (4 independent 64-bit sums per thread, -O3 -march=native) at the same counts, for comparison."""
    import tempfile

    from llmopt.ort.bench import _bandwidth_probe, _probe_threads, memory_bandwidth, probe_method

    counts = _probe_threads(threads)
    out = {"method": probe_method(threads), "bench_probe_gbs": memory_bandwidth(threads) / 1e9,
           "numpy_gbs_by_threads": {t: _bandwidth_probe(t, 1024, 5) / 1e9 for t in counts}}
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        with tempfile.TemporaryDirectory() as d:
            src, exe = Path(d) / "read.c", Path(d) / "read"
            src.write_text(C_READ)
            subprocess.run([cc, "-O3", "-march=native", "-pthread", str(src), "-o", str(exe)], check=True)
            out["c_read_gbs_by_threads"] = {t: float(subprocess.run([str(exe), str(t), "1024"], capture_output=True,
                                                                     text=True, check=True).stdout) for t in counts}
    return out


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _ratio(a: list[dict], b: list[dict], key: str, inverse: bool = False) -> dict:
    rs = [(y[key] / x[key]) if inverse else (x[key] / y[key]) for x, y in zip(a, b)]
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}


def _header(size: str, p: dict) -> dict:
    import llamacpp

    cfg = json.loads((p["hf"] / "config.json").read_text())
    return {"machine": machine(), "size": size, "llama_cpp": llamacpp.version(),
            "model": {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads")},
            "fp32_bytes": model_io.files_bytes(model_io.model_files(p["source"])),
            "artifact_bytes": {k: model_io.files_bytes(model_io.model_files(v)) for k, v in p["artifacts"].items()},
            "gguf_bytes": {k: v.stat().st_size for k, v in p["ggufs"].items()},
            "prompt": PROMPT, "new_tokens": NEW, "threads": THREADS}


def speed(size: str, root: Path, rounds: int) -> dict:
    import llamacpp

    p = prepare(size, root)
    out = {**_header(size, p), "rounds": rounds, "agreement_with_export": agreement(p["source"], p["artifacts"])}
    gens = {t: Generator(a, threads=THREADS) for t, a in p["artifacts"].items()}
    for g in gens.values():
        generation_speed(g, 0)
    runs: dict[str, list[dict]] = {k: [] for k in [*gens, *p["ggufs"]]}
    for r in range(rounds):
        for t, g in gens.items():
            runs[t].append(generation_speed(g, r + 1))
        for kind, gguf in p["ggufs"].items():
            runs[kind].append(llamacpp.bench(gguf, PROMPT, NEW, THREADS))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]['decode_tokens_per_s']:.1f}/{v[-1]['prefill_tokens_per_s']:.0f}"
                                                       for k, v in runs.items()), flush=True)
    keys = ("decode_tokens_per_s", "prefill_tokens_per_s")
    out["rows"] = {k: {key: _med(v, key) for key in keys} for k, v in runs.items()}
    # the roofline: bytes a batch-1 decode step reads (llmopt bench's count) over the probe's bandwidth
    from llmopt.ort.bench import weight_bytes
    from llmopt.ort.machine import last_level_cache_bytes

    probes = bandwidth_probes()
    bw = probes["bench_probe_gbs"] * 1e9
    llc = last_level_cache_bytes()
    out["roofline"] = {"probes": probes, "last_level_cache_bytes": llc, "artifacts": {}}
    for t, art in p["artifacts"].items():
        read = weight_bytes(art).read_per_step(1)
        tps = out["rows"][t]["decode_tokens_per_s"]
        out["roofline"]["artifacts"][t] = {
            "bytes_read_per_step": read, "roofline_tokens_per_s": bw / read, "fraction": tps * read / bw,
            "streamed_gbs": tps * read / 1e9, "fits_last_level_cache": bool(llc and read <= llc)}
    out["ratios"] = {f"{t} / {kind}": {key: _ratio(runs[t], runs[kind], key) for key in keys} for t, kind in TARGETS.items()}
    out["llama_cpp_build"] = runs[next(iter(p["ggufs"]))][0].get("build")
    return out


def batch(size: str, root: Path, rounds: int, batches: list[int]) -> dict:
    p = prepare(size, root)
    out = {**_header(size, p), "rounds": rounds, "batches": batches,
           "form": "time for 100 new tokens after a 64-token prompt (prefill included) / 100 / batch"}
    gens = {t: Generator(a, threads=THREADS) for t, a in p["artifacts"].items()}
    for g in gens.values():
        llmopt_batch(g, 1, 0)
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(rounds):
        for b in batches:
            for t, g in gens.items():
                runs.setdefault((t, b), []).append(llmopt_batch(g, b, r + 1))
            for kind, gguf in p["ggufs"].items():
                runs.setdefault((kind, b), []).append(peer_batch(gguf, b))
            print(f"round {r + 1}/{rounds} batch {b}: " + ", ".join(f"{k} {v[-1]['ms_per_token']:.2f} ms"
                                                                     for (k, bb), v in runs.items() if bb == b), flush=True)
    out["rows"] = {f"{k} b{b}": {"ms_per_token": _med(v, "ms_per_token")} for (k, b), v in runs.items()}
    # speed ratio: the peer's time per token over llmopt's (> 1: llmopt is faster)
    out["ratios"] = {f"{t} / {kind} b{b}": _ratio(runs[(t, b)], runs[(kind, b)], "ms_per_token", inverse=True)
                     for t, kind in TARGETS.items() for b in batches}
    return out


def logits_ablation(size: str, root: Path, rounds: int) -> dict:
    """Prefill tok/s of each target with and without its ``logits-to-keep`` step, alternated."""
    p = prepare(size, root)
    gens = {}
    for t in TARGETS:
        without = get_target(t).pipeline.replace("logits-to-keep,", "")
        out = work_dir(size, root) / f"{t}-all-logits"
        if not (out / "llmopt.json").is_file() or json.loads((out / "llmopt.json").read_text())["pipeline"] != without:
            llmopt.compile(p["source"], target=t, out=out, passes=without, measure_speed=False, verify_model=False)
        gens[t] = Generator(p["artifacts"][t], threads=THREADS)
        gens[f"{t} without logits-to-keep"] = Generator(out, threads=THREADS)
    runs = round_robin(gens, rounds)
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s")
    return {**_header(size, p), "rounds": rounds,
            "rows": {k: {key: _med(v, key) for key in keys} for k, v in runs.items()},
            "ratios": {f"{t} with / without": {key: _ratio(runs[t], runs[f"{t} without logits-to-keep"], key) for key in keys}
                       for t in TARGETS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("prepare", "speed", "batch", "logits"))
    ap.add_argument("--size", choices=tuple(DISK_NEEDED), default="50m")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("LLMOPT_BENCH_CACHE", Path.home() / ".cache" / "llmopt-bench")) / "peer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.what == "prepare":
        print({k: str(v) for k, v in prepare(args.size, args.work).items()})
        return
    if args.what == "speed":
        result = speed(args.size, args.work, args.rounds)
    elif args.what == "logits":
        result = logits_ablation(args.size, args.work, args.rounds)
    else:
        result = batch(args.size, args.work, args.rounds, [int(b) for b in args.batches.split(",")])
    out = args.out or RESULTS / f"peer-{args.what}-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("rows", "ratios")}, indent=1))


if __name__ == "__main__":
    main()

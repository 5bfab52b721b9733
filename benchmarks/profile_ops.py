"""Where decode time goes: ONNX Runtime's profiler, grouped by op type.

    python benchmarks/profile_ops.py MODEL.onnx [MODEL2.onnx ...] [--steps 30] [--prefill 64] [--batch 1]

Runs single-token decode steps (after 128 cached tokens, batch 1, 2 threads) — or, with
``--prefill N``, N-token prompts from an empty cache — and prints, per model, the mean kernel
time per step of each op type (after 3 unprofiled warm-up steps). Used to choose between quantized MatMul kernels
(docs/architecture.md) and to find where int4 time goes (issue 16).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import onnxruntime as ort

import llmopt
from llmopt.ort import timing
from llmopt.ort import sessions


WARMUP = 3


def profile(path: str, steps: int, prefill: int = 0, batch: int = 1) -> dict[str, float]:
    if prefill:
        from llmopt.ort import verify

        feeds = verify.sample_inputs(llmopt.load(path), verify.SampleShape(batch, prefill, 0), seed=123)
    else:
        feeds = timing.decode_feeds(llmopt.load(path), past=128, batch=batch)
    so = sessions.session_options(threads=2)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "prof")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    f = {i.name: feeds[i.name] for i in sess.get_inputs()}
    for _ in range(WARMUP + steps):
        sess.run(names, f)
    trace = sess.end_profiling()
    per_op: collections.Counter[str] = collections.Counter()
    with open(trace) as fh:
        events = json.load(fh)
    # the first runs pay one-time costs (first touch of memory-mapped weights, kernel setup): skipped
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    start = runs[WARMUP - 1] if len(runs) >= WARMUP else 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
    os.remove(trace)
    return {op: us / steps / 1000 for op, us in per_op.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prefill", type=int, default=0, help="profile N-token prompts instead of decode steps")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    for path in args.models:
        ms = profile(path, args.steps, args.prefill, args.batch)
        print(f"{path}: {sum(ms.values()):.2f} ms of kernels per step")
        for op, t in list(ms.items())[:8]:
            print(f"  {op:<36} {t:7.3f} ms")


if __name__ == "__main__":
    main()

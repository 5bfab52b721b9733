"""ONNX Runtime's quantized MatMul kernels one at a time (issue 16; docs/benchmarks.md, "Side by side
with llama.cpp"): where int4 prefill and decode time goes is these kernels' speed.

    python benchmarks/matmul_kernels.py [--k 2048 --n 5632] [--rounds 5]

One single-node graph per kernel and layout, a weight ``[K, N]`` (default: the 1B model's
gate/up projection), run by ONNX Runtime's CPU provider with 2 threads on ``M`` = 1 (a decode
step), 64 (a prompt) and 256 rows. GOPS = 2·M·K·N / seconds, the median over rounds of each
kernel's median time; the kernels alternate within each round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from _common import RESULTS, machine  # noqa: E402

ROWS = (1, 64, 256)


def _nbits(k: int, n: int, bits: int, block: int, accuracy: int, symmetric: bool, rng) -> tuple:
    nb = -(-k // block)
    inits = [numpy_helper.from_array(rng.integers(0, 255, size=(n, nb, block * bits // 8), dtype=np.uint8), "w"),
             numpy_helper.from_array((rng.random(n * nb) * 0.01).astype(np.float32), "s")]
    inputs = ["x", "w", "s"]
    if not symmetric:
        inits.append(numpy_helper.from_array(rng.integers(0, 255, size=(n * -(-nb * bits // 8),), dtype=np.uint8), "z"))
        inputs.append("z")
    return helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy), inits


def kernels(k: int, n: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "MatMulNBits 4-bit, block 32, zero points, int8 compute (cpu-int4)": _nbits(k, n, 4, 32, 4, False, rng),
        "MatMulNBits 4-bit, block 32, symmetric, int8 compute": _nbits(k, n, 4, 32, 4, True, rng),
        "MatMulNBits 4-bit, block 128, zero points, int8 compute": _nbits(k, n, 4, 128, 4, False, rng),
        "MatMulNBits 4-bit, block 32, zero points, fp32 compute": _nbits(k, n, 4, 32, 0, False, rng),
        "MatMulNBits 8-bit, block 128, symmetric, int8 compute (cpu-int8)": _nbits(k, n, 8, 128, 4, True, rng),
        "MatMulNBits 8-bit, block 32, symmetric, int8 compute": _nbits(k, n, 8, 32, 4, True, rng),
        "DynamicQuantizeMatMul int8, per channel": (
            helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft"),
            [numpy_helper.from_array(rng.integers(-127, 127, size=(k, n), dtype=np.int8), "w"),
             numpy_helper.from_array(rng.random(n).astype(np.float32), "s")]),
        "MatMul fp32": (helper.make_node("MatMul", ["x", "w"], ["y"]),
                        [numpy_helper.from_array(rng.random((k, n), dtype=np.float32), "w")]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--n", type=int, default=5632)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "matmul-kernels.json")
    args = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 2, 3
    sessions = {}
    for name, (node, inits) in kernels(args.k, args.n).items():
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", args.k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", args.n])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        sessions[name] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xs = {m: np.random.default_rng(m).random((m, args.k), dtype=np.float32) for m in ROWS}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            for m in ROWS:
                for _ in range(2):
                    s.run(None, {"x": xs[m]})
                ts = []
                for _ in range(max(3, 64 // m)):
                    t0 = time.perf_counter()
                    s.run(None, {"x": xs[m]})
                    ts.append(time.perf_counter() - t0)
                times.setdefault((name, m), []).append(statistics.median(ts))
    rows = {name: {f"M={m}": {"ms": statistics.median(times[(name, m)]) * 1e3,
                              "gops": 2 * m * args.k * args.n / statistics.median(times[(name, m)]) / 1e9} for m in ROWS}
            for name in sessions}
    result = {"machine": machine(), "k": args.k, "n": args.n, "threads": 2, "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, r in rows.items():
        print(f"{name:68s} " + "  ".join(f"M={m}: {r[f'M={m}']['gops']:6.1f} GOPS" for m in ROWS))


if __name__ == "__main__":
    main()

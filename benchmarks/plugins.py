"""Plugins (issue #7; docs/benchmarks.md, "Plugins"): what a user's pass costs around it.

    python benchmarks/plugins.py [--rounds 5] [--out benchmarks/results/plugins.json]

On the ~50M Llama export (random weights; 201 MB of fp32 weights, memory-mapped):

1. Memory of the onnx-graphsurgeon adapter: peak RSS of a fresh process that loads the model and
   runs the example `drop-nan-guard-gs` pass through `GraphSurgeonPass`, against one that only
   loads the model, and one that loads it and reads every weight. The adapter should cost a small
   fraction of the weight bytes (its weights cross by reference), reading all weights costs them all.
2. Time of the plugin guard: `fold,cleanup,drop-nan-guard` (the example pattern-rule pass) with
   the guard (checker + ONNX Runtime before and after the pass) and with `check_plugins=False`,
   alternated in one process, median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "docs" / "examples" / "plugin"))

from _common import RESULTS, machine, peak_rss_of  # noqa: E402

CHILD = """
import sys
sys.path.insert(0, {plugin_dir!r})
import llmopt
model = llmopt.load({model!r})
mode = {mode!r}
if mode == "adapter":
    from llmopt_example_plugin.surgeon import DropNanGuardGS
    p = DropNanGuardGS()
    assert p(model).modified and p.counters["guards_removed"] > 0 and "bytes_loaded" not in p.counters
elif mode == "read-all":
    total = sum(float(v.const_value.numpy().sum()) for v in model.graph.initializers.values() if v.const_value is not None)
"""


def rss(model: Path, mode: str) -> int:
    code = CHILD.format(plugin_dir=str(HERE.parent / "docs" / "examples" / "plugin"), model=str(model), mode=mode)
    return peak_rss_of([sys.executable, "-c", code])[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "plugins.json")
    args = ap.parse_args()

    import llmopt
    from llmopt.core import model_io, graph_util
    from llmopt.frontend.exporter import export
    from llmopt.models.architectures import build
    from llmopt.core.registry import register_pass
    from llmopt_example_plugin.rules import DropNanGuardPass

    register_pass(DropNanGuardPass)
    result = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="llmopt-plugins-") as tmp:
        work = Path(tmp)
        src = export(build("llama", work / "hf", size="50m"), work / "llama50m.onnx", with_past=True)
        weights = graph_util.initializer_bytes(model_io.load(src))
        memory = {mode: [] for mode in ("load", "adapter", "read-all")}
        for _ in range(args.rounds):  # alternated, fresh processes
            for mode in memory:
                memory[mode].append(rss(src, mode))
        med = {m: statistics.median(v) for m, v in memory.items()}
        result["memory"] = {
            "weights_bytes": weights,
            "peak_rss_bytes": med,
            "adapter_extra_vs_weights": (med["adapter"] - med["load"]) / weights,
            "read_all_extra_vs_weights": (med["read-all"] - med["load"]) / weights,
        }
        times = {"guarded": [], "trusted": []}
        for _ in range(args.rounds):
            for mode in times:
                model = llmopt.load(src)
                t0 = time.perf_counter()
                llmopt.run_pipeline(model, "fold,cleanup,drop-nan-guard", check_plugins=(mode == "guarded"))
                times[mode].append(time.perf_counter() - t0)
        ratios = [g / t for g, t in zip(times["guarded"], times["trusted"])]
        result["guard"] = {"guarded_s": statistics.median(times["guarded"]), "trusted_s": statistics.median(times["trusted"]),
                           "ratio": statistics.median(ratios), "rounds": args.rounds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    m, g = result["memory"], result["guard"]
    print(f"machine: {result['machine']}")
    print(f"weights {m['weights_bytes'] / 2**20:.0f} MiB; peak RSS (median of {args.rounds} fresh processes): "
          + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in m["peak_rss_bytes"].items()))
    print(f"graphsurgeon adapter: +{m['adapter_extra_vs_weights']:.1%} of the weight bytes over loading; "
          f"reading every weight: +{m['read_all_extra_vs_weights']:.1%}")
    print(f"plugin guard: pipeline {g['trusted_s']:.2f}s without, {g['guarded_s']:.2f}s with "
          f"({g['ratio']:.2f}x, median of {g['rounds']} alternated rounds)")


if __name__ == "__main__":
    main()

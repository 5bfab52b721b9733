"""Export forms of the same weights compile alike (issue 13, first figures; docs/benchmarks.md).

    python benchmarks/export_forms.py [--pairs 60]

The ~50M Llama (random weights, models/architectures.py "50m") exported five ways: llmopt's own
export with KV-cache I/O, llmopt's own export without, the plainest torch.onnx export people write
themselves (``torch.onnx.export(model, (input_ids,), dynamo=True)``, logits only), a TorchScript
export (``dynamo=False``, input_ids + attention_mask) and Hugging Face Optimum's
(``optimum-cli export onnx --task text-generation-with-past``, in its own venv:
benchmarks/optimum_export.py; ``--no-optimum`` skips it). Each is compiled to ``cpu-int8`` with the
target's defaults (its single-token speedup over its own source measured by the compile, 15 pairs);
the table gives nodes, artifact size and verification, and the decode-step latency of each artifact
against the first, alternated in one fresh process (one new token after 128 cached, batch 1,
2 threads; medians of per-pair ratios).
Keep the machine quiet while it runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402


def time_artifacts(paths: list[str], pairs: int) -> list[dict]:
    """Each artifact's decode step against the first's, alternated (run in a fresh process)."""
    from llmopt.core import model_io
    from llmopt.ort import timing
    from llmopt.ort import sessions

    runs = [sessions.make_session(p, threads=2) for p in paths]
    feeds = [timing.decode_feeds(model_io.load(p), past=128) for p in paths]
    return [timing.compare_sessions_feeds(runs[0], feeds[0], s, f, pairs=pairs) for s, f in zip(runs[1:], feeds[1:])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--time", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--no-optimum", action="store_true", help="skip the Optimum export (it builds its own venv once)")
    a = ap.parse_args()
    if a.time:
        print(json.dumps(time_artifacts(a.time, a.pairs)))
        return
    import llmopt
    from llmopt.frontend.exporter import export
    from llmopt.models.architectures import build, export_input_ids_only, export_torchscript

    rows = []
    with tempfile.TemporaryDirectory(prefix="llmopt-forms-") as tmp:
        work = Path(tmp)
        hf = build("llama", work / "hf", size="50m")
        sources = {
            "llmopt export --with-past": export(hf, work / "past" / "model.onnx", with_past=True),
            "llmopt export (no cache)": export(hf, work / "plain" / "model.onnx"),
            "torch.onnx.export(model, (input_ids,))": export_input_ids_only(hf, work / "ids.onnx"),
            "TorchScript (dynamo=False)": export_torchscript(hf, work / "ts" / "model.onnx"),
        }
        if not a.no_optimum:
            from optimum_export import export_with_optimum

            sources["Optimum (optimum-cli export onnx)"] = export_with_optimum(hf, work / "optimum")
        arts = {}
        for name, src in sources.items():
            arts[name] = llmopt.compile(src, "cpu-int8", work / f"art{len(arts)}")
        out = subprocess.run([sys.executable, __file__, "--pairs", str(a.pairs), "--time",
                              *(str(art.model_path) for art in arts.values())], capture_output=True, text=True, check=True)
        ratios = [None] + json.loads(out.stdout.strip().splitlines()[-1])
        for (name, art), r in zip(arts.items(), ratios):
            rep = art.report
            rows.append((name, rep["artifact"]["source_nodes"], rep["artifact"]["nodes"], rep["artifact"]["bytes"],
                         rep["verification"]["figures"]["cosine"], rep["speed"]["speedup"], r))
    m = machine()
    print(f"{m['date']}, {m['cpu']} ({m['cores']} cores, L3 {m['last_level_cache_mib']} MiB), onnxruntime {m['onnxruntime']}, "
          f"torch {m.get('torch')}\n")
    print("| export | source nodes | cpu-int8 nodes | artifact MiB | verify cosine | speedup over its source | "
          "decode speed vs the first: its step time / this one's (median, range) |")
    print("|---|---|---|---|---|---|---|")
    for name, src_nodes, nodes, size, cos, speedup, r in rows:
        speed = "1.00x (reference)" if r is None else f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}), {r['b_ms']:.2f} vs {r['a_ms']:.2f} ms"
        print(f"| {name} | {src_nodes} | {nodes} | {size / 2**20:.1f} | {cos:.6f} | {speedup:.2f}x | {speed} |")


if __name__ == "__main__":
    main()

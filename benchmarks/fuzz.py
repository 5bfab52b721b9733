"""The figures behind issue 12 (docs/benchmarks.md, "Faults and fuzzing").

    python benchmarks/fuzz.py [--damaged 340] [--pipeline 200] [--interrupt 60] [--seed 1]

Exports the tiny random Llama (models/architectures.py), then runs tests/faults.py on it: damaged
copies of the model through `llmopt compile` / `inspect`, malformed pipelines, recipes and options,
and recompiles over a previous artifact interrupted by SIGINT or SIGKILL at random moments. Prints
the table (cases by kind and how each was judged) and writes every case to
benchmarks/results/fuzz.json. Takes ~10 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS, machine  # noqa: E402

COLUMNS = ["cases", "exit 0", "exit 1", "exit 2", "exit 130", "killed", "finished first", "tracebacks", "not one line",
           "inputs modified", "partial outputs", "previous artifacts lost"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--damaged", type=int, default=340)
    ap.add_argument("--pipeline", type=int, default=200)
    ap.add_argument("--interrupt", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    from llmopt.frontend.exporter import export
    from llmopt.models.architectures import build

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "fuzz.json"
    with tempfile.TemporaryDirectory(prefix="llmopt-fuzz-") as tmp:
        model = export(build("llama", Path(tmp) / "hf"), Path(tmp) / "model.onnx", with_past=True)
        # a fresh interpreter: the harness forks per case, which must happen before any thread exists
        subprocess.run([sys.executable, str(HERE.parent / "tests" / "faults.py"), str(model), f"--damaged={a.damaged}",
                        f"--pipeline={a.pipeline}", f"--interrupt={a.interrupt}", f"--seed={a.seed}", "--json", str(out)],
                       stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["machine"] = machine()
    out.write_text(json.dumps(result, indent=2))
    m = result["machine"]
    print(f"{m['date']}, {m['cpu']} ({m['cores']} cores, L3 {m['last_level_cache_mib']} MiB), onnxruntime {m['onnxruntime']}, seed {a.seed}\n")
    print("| kind | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for kind, row in result["table"].items():
        print(f"| {kind} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    total = {c: sum(r[c] for r in result["table"].values()) for c in COLUMNS}
    print("| **all** | " + " | ".join(f"**{total[c]}**" for c in COLUMNS) + " |")
    print(f"\n{len(result['bad'])} bad cases" + "".join(f"\n- {b['kind']}: {b['case']}" for b in result["bad"]))


if __name__ == "__main__":
    main()

"""Coverage of the ecosystem: decoder architectures × export forms, compiled with llmopt's defaults
(issue 13; writes docs/coverage.md).

    python benchmarks/coverage.py                      # every architecture × form (long: ~1 min a row)
    python benchmarks/coverage.py --archs llama,granite --forms cache,torchscript
    python benchmarks/coverage.py --markdown-only      # docs/coverage.md from the saved results

Each architecture is a tiny random Hugging Face model (models/architectures.py: two layers, hidden
64; nothing downloaded), exported in each form:

- ``cache``: llmopt's own export (torch.onnx dynamo) with attention mask and KV-cache I/O;
- ``ids``: ``torch.onnx.export(model, (input_ids,), dynamo=True)``, logits only — the first export
  people write themselves;
- ``torchscript``: ``torch.onnx.export(..., dynamo=False)`` with ``input_ids`` and ``attention_mask``,
  the exporter Hugging Face Optimum uses;
- ``optimum``: Optimum itself (``optimum-cli export onnx --task text-generation-with-past``, in
  its own venv with transformers 4.57: benchmarks/optimum_export.py);
- ``builder``: onnxruntime-genai's model builder (``-p fp32 -e cpu``), already fused.

Every row is compiled to ``cpu-fp32`` (``--explain fuse``) and to ``cpu-int8`` with the targets'
defaults (speed measurement off: not a column here). The row gives the fused attention / norm /
rotary nodes against the layer count, nodes per decoder layer after ``cpu-fp32`` (the nodes of the
first layer: nodes attributed to a layer by the names of the weights upstream of them; where
folding renamed those, the nodes from the first layer's attention node to the second's), both verifications, the
fuse guard's rollbacks, greedy equality of 32 new tokens generated with the artifact's KV cache
against full recomputation by the source, and the reason wherever attention stays unfused.
Each row runs in its own process (an exporter crash is a row's failure, not the sweep's).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FORMS = ("cache", "ids", "torchscript", "optimum", "builder")
FORM_TITLES = {
    "cache": "dynamo + mask + cache (llmopt export)",
    "ids": "dynamo, input_ids only",
    "torchscript": "TorchScript (dynamo=False)",
    "optimum": "Optimum (text-generation-with-past)",
    "builder": "onnxruntime-genai builder",
}
# What Optimum 2.1 / the genai builder export (the other architectures they refuse); run where listed.
OPTIMUM = ("llama", "mistral", "qwen2", "phi3", "gemma", "gpt2", "granite", "qwen3", "olmo", "stablelm")
BUILDER = ("llama", "mistral", "qwen2", "phi3", "gemma", "granite", "qwen3", "olmo", "smollm3", "gemma2")
ATTENTION_OPS = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedMultiHeadAttention"}
NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "SkipLayerNormalization"}
_LAYER = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?)[./_](\d+)(?:[./_]|$)")
JSON_PATH = RESULTS / "coverage.json"


# --------------------------------------------------------------------------- one row (child process)


def export_form(arch: str, form: str, hf: Path, work: Path) -> Path:
    from llmopt.frontend.exporter import export
    from llmopt.models.architectures import export_input_ids_only, export_torchscript

    if form == "cache":
        return export(hf, work / "cache" / "model.onnx", with_past=True)
    if form == "ids":
        return export_input_ids_only(hf, work / "ids" / "model.onnx")
    if form == "torchscript":
        return export_torchscript(hf, work / "ts" / "model.onnx")
    if form == "optimum":
        from optimum_export import export_with_optimum

        return export_with_optimum(hf, work / "optimum")
    if form == "builder":
        import shutil

        from llmopt.frontend.exporter import reference_model_dir

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # it saves one
            shutil.copy(reference_model_dir() / name, hf / name)
        out = work / "builder"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
               "-p", "fp32", "-e", "cpu", "-c", str(work / "builder-cache")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not (out / "model.onnx").is_file():
            tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
            raise RuntimeError(f"builder failed: {tail[-1] if tail else r.returncode}")
        return out / "model.onnx"
    raise ValueError(form)


def layer_counts(model) -> dict[int, int]:
    """Nodes per decoder layer: a node belongs to the highest layer among the weights upstream of it."""
    layer_of: dict[int, int] = {}
    counts: dict[int, int] = {}
    for node in model.graph:
        best = -1
        for v in node.inputs:
            if v is None:
                continue
            if id(v) in layer_of:
                best = max(best, layer_of[id(v)])
            elif v.is_initializer() and v.name and (m := _LAYER.search(v.name)):
                best = max(best, int(m.group(1)))
        for v in node.outputs:
            layer_of[id(v)] = best
        counts[best] = counts.get(best, 0) + 1
    return counts


def _segment(model, layers: int) -> int | None:
    """Nodes per layer when no weight names tell (folding renamed them): the nodes from the first
    layer's attention node to the second's, in graph order."""
    nodes = list(model.graph)
    at = [i for i, n in enumerate(nodes) if n.op_type in ATTENTION_OPS]
    if len(at) != layers:
        at = [i for i, n in enumerate(nodes) if n.op_type == "Softmax"]
    return at[1] - at[0] if layers >= 2 and len(at) == layers else None


def run_row(arch: str, form: str, work: Path) -> dict:
    import llmopt
    from llmopt.models.architectures import build, config

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    row: dict = {"arch": arch, "form": form, "commit": commit}
    cfg = config(arch)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    row["layers"] = layers
    hf = build(arch, work / "hf")
    t0 = time.perf_counter()
    try:
        src = export_form(arch, form, hf, work)
    except Exception as exc:  # noqa: BLE001 - a failed export is this row's result
        row["export_error"] = _line(exc)
        return row
    row["export_seconds"] = round(time.perf_counter() - t0, 1)
    src_model = llmopt.load(src)
    row["source_nodes"] = len(list(src_model.graph))
    row["source_inputs"] = [v.name for v in src_model.graph.inputs]
    del src_model
    for target in ("cpu-fp32", "cpu-int8"):
        key = target.replace("cpu-", "")
        try:
            art = llmopt.compile(src, target=target, out=work / f"art-{key}", measure_speed=False,
                                 explain=("fuse",) if key == "fp32" else ())
        except Exception as exc:  # noqa: BLE001
            row[key] = {"error": _line(exc)}
            report = getattr(exc, "report", None)
            if report:
                row[key]["verification"] = report.get("verification", {}).get("figures")
            continue
        rep = art.report
        row[key] = {"passed": rep["verification"]["passed"], "figures": rep["verification"]["figures"],
                    "nodes": rep["artifact"]["nodes"],
                    "warnings": rep.get("warnings", [])}
        if key == "fp32":
            row[key].update(_fused(art, rep, layers))
    if "fp32" in row and "error" not in row["fp32"]:
        row["greedy"] = _greedy(src, work / "art-fp32")
    return row


def _fused(art, rep: dict, layers: int) -> dict:
    import llmopt

    model = llmopt.load(art.model_path)
    ops = [n.op_type for n in model.graph]
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    rotary_in_kernel = sum(1 for n in gqa if n.attributes.get_int("do_rotary", 0))
    counts = layer_counts(model)
    fuse = next((p for p in rep["passes"] if p["name"] == "fuse"), {})
    reasons = []
    for e in fuse.get("explanations") or []:
        if e.get("stage") in ("sdpa", "gqa", "mha1", "mha2", "attention") and e.get("status") != "success":
            reasons.append(f"{e.get('stage')}/{e.get('rule')}: {e.get('reason')}")
    return {
        "attention": sum(ops.count(o) for o in ATTENTION_OPS),
        "attention_ops": sorted({o for o in ops if o in ATTENTION_OPS}),
        "norms": sum(ops.count(o) for o in NORM_OPS),
        "rotary": ops.count("RotaryEmbedding") + rotary_in_kernel,
        "nodes_first_layer": counts.get(0) or _segment(model, layers),
        "nodes_outside_layers": counts.get(-1, 0),
        "rolled_back": (fuse.get("counters") or {}).get("rolled_back", 0),
        "has_cache": any(v.name.startswith("past_key_values") for v in model.graph.inputs),
        "attention_reasons": reasons[:2],
    }


def _greedy(src: Path, artifact: Path) -> dict:
    from llmopt.errors import LlmoptError
    from llmopt.ort.generation import Generator, greedy_by_recompute

    prompt = [5, 17, 42, 8, 99, 3, 250, 61]
    try:
        gen = Generator(artifact, threads=2)
    except LlmoptError as exc:
        return {"status": "no cache", "why": _line(exc)}
    cached = gen.generate([prompt], max_new_tokens=32, eos_token_id=-1).tokens[0]
    full = greedy_by_recompute(src, prompt, 32)
    agree = next((i for i, (a, b) in enumerate(zip(cached, full)) if a != b), len(full))
    return {"status": "equal" if cached == full else "differ", "first_difference": agree if cached != full else None}


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# --------------------------------------------------------------------------- the sweep


def sweep(archs: list[str], forms: list[str], resume: bool) -> dict:
    data = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {"rows": {}}  # rows not rerun stay
    data["machine"] = machine()
    rows = data["rows"]
    for arch in archs:
        for form in forms:
            if form == "optimum" and arch not in OPTIMUM or form == "builder" and arch not in BUILDER:
                continue
            key = f"{arch}/{form}"
            if resume and key in rows and "crash" not in rows[key]:
                continue
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="llmopt-coverage-") as tmp:
                r = subprocess.run([sys.executable, __file__, "--row", arch, form, tmp], capture_output=True, text=True,
                                   timeout=1800, cwd=REPO)
            out = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode == 0 and out:
                rows[key] = json.loads(out[-1])
            else:
                tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
                rows[key] = {"arch": arch, "form": form, "crash": tail[-1][:300] if tail else f"exit {r.returncode}"}
            rows[key]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{key}: {summary(rows[key])} ({rows[key]['seconds']} s)", file=sys.stderr, flush=True)
            RESULTS.mkdir(exist_ok=True)
            JSON_PATH.write_text(json.dumps(data, indent=1))
    return data


def summary(row: dict) -> str:
    if "crash" in row:
        return f"crash: {row['crash']}"
    if "export_error" in row:
        return f"export failed: {row['export_error']}"
    fp32 = row.get("fp32", {})
    if "error" in fp32:
        return f"cpu-fp32 failed: {fp32['error']}"
    return (f"attn {fp32['attention']}/{row['layers']} norms {fp32['norms']} rotary {fp32['rotary']} "
            f"layer0 {fp32['nodes_first_layer']} nodes; fp32 max-abs {fp32['figures']['max_abs']:.2g}; "
            f"int8 {'ok' if row.get('int8', {}).get('passed') else 'FAIL'}; greedy {row.get('greedy', {}).get('status')}")


# --------------------------------------------------------------------------- docs/coverage.md


def markdown(data: dict) -> str:
    m = data["machine"]
    rows = data["rows"]
    commits = sorted({r.get("commit") or "earlier" for r in rows.values()})
    head = [
        "# Coverage: architectures × export forms",
        "",
        "Generated by `python benchmarks/coverage.py` (do not edit by hand): "
        f"{m['date']}, {m.get('cpu')} ({m.get('cores')} cores, L3 {m.get('last_level_cache_mib')} MiB), "
        f"ONNX Runtime {m.get('onnxruntime')}, torch {m.get('torch')}; rows ran at llmopt commits "
        f"{', '.join(commits)} (each row's in benchmarks/results/coverage.json).",
        "",
        "Every row is a tiny random model of the architecture (2 layers; `models/architectures.py`, nothing "
        "downloaded), exported as the section says, then compiled with `llmopt compile --target cpu-fp32 "
        "--explain fuse` and `--target cpu-int8`, the targets' defaults. Columns:",
        "",
        "- **attn**: fused attention nodes (GroupQueryAttention, MultiHeadAttention) / layers;",
        "- **norms**: fused (Skip)(Simplified)LayerNormalization nodes (a pre-norm decoder has 2 per layer + 1; "
        "architectures with q/k norms or extra norms have more);",
        "- **rotary**: RotaryEmbedding nodes, or GroupQueryAttention nodes with the rotary inside (0: no rotary, "
        "or left unfused);",
        "- **nodes/layer**: nodes of one decoder layer after `cpu-fp32` (the goal is ≤ 15);",
        "- **fp32 max-abs**: the `cpu-fp32` verification, largest |Δ logits| against the source (batch 2; with and "
        "without past where the graph has a cache); **int8**: the `cpu-int8` verification;",
        "- **rolled back**: groups of rewrites the fuse guard undid because they changed the numbers or did not run;",
        "- **greedy**: 32 greedy tokens from the artifact with its KV cache against full recomputation by the source "
        "(`no cache`: the artifact has none — its attention is not GroupQueryAttention, which `kv-cache` needs "
        "to add one);",
        "- **why unfused**: the check `--explain fuse` names where attention stays unfused, or why the row failed.",
        "",
    ]
    forms = [f for f in FORMS if any(r["form"] == f for r in rows.values())]
    archs = sorted({r["arch"] for r in rows.values()})
    totals = {"rows": 0, "attention_fused": 0, "dense": 0, "int8_ok": 0, "wrong_kept": 0, "failed": 0, "greedy_equal": 0,
              "cached": 0}
    body = []
    for form in forms:
        body += [f"## {FORM_TITLES[form]}", "",
                 "| architecture | attn | norms | rotary | nodes/layer | fp32 max-abs | int8 | rolled back | greedy | why unfused |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for arch in archs:
            r = rows.get(f"{arch}/{form}")
            if r is not None:
                totals["rows"] += 1
                body.append(_md_row(r, totals))
        body.append("")
    t = totals
    summary = [
        "## Summary", "",
        f"{t['rows']} rows over {len(archs)} architectures. Attention fused on {t['attention_fused']} rows, "
        f"{t['dense']} of them at ≤ 15 nodes per layer; `cpu-int8` compiles and verifies on {t['int8_ok']}; "
        f"greedy decoding with the cache equals full recomputation on {t['greedy_equal']} of the {t['cached']} rows "
        f"whose artifact has a cache; rows that failed to export or compile: {t['failed']}; rows where `fuse` kept a "
        f"graph whose fp32 logits differ from the source by more than 1e-4: {t['wrong_kept']}.", "",
    ]
    return "\n".join(head + summary + body) + "\n"


def _md_row(r: dict, totals: dict) -> str:
    name = r["arch"]
    if "crash" in r or "export_error" in r:
        totals["failed"] += 1
        why = r.get("export_error") or r.get("crash")
        return f"| {name} | – | – | – | – | – | – | – | – | export failed: {_cell(why)} |"
    fp32 = r.get("fp32", {})
    if "error" in fp32:
        totals["failed"] += 1
        return f"| {name} | – | – | – | – | – | – | – | – | cpu-fp32 failed: {_cell(fp32['error'])} |"
    L = r["layers"]
    per_layer = fp32.get("nodes_first_layer")
    if fp32["attention"] >= L:
        totals["attention_fused"] += 1
        totals["dense"] += int(per_layer is not None and per_layer <= 15)
    if fp32["figures"]["max_abs"] > 1e-4:
        totals["wrong_kept"] += 1
    int8 = r.get("int8", {})
    if int8.get("passed"):
        totals["int8_ok"] += 1
        int8_cell = "PASS"
    else:
        int8_cell = _cell(int8.get("error", "FAIL"))[:80]
    greedy = r.get("greedy", {})
    g = greedy.get("status", "–")
    if g in ("equal", "differ"):
        totals["cached"] += 1
        totals["greedy_equal"] += g == "equal"
    if g == "differ":
        g = f"differ at token {greedy.get('first_difference')}"
    why = "" if fp32["attention"] >= L else _cell("; ".join(fp32.get("attention_reasons") or []) or "no rule matched")
    ops = "/".join(o.replace("GroupQueryAttention", "GQA").replace("MultiHeadAttention", "MHA") for o in fp32.get("attention_ops", []))
    return (f"| {name} | {fp32['attention']}/{L}{' ' + ops if ops else ''} | {fp32['norms']} | {fp32['rotary']} | "
            f"{per_layer if per_layer is not None else '–'} | {fp32['figures']['max_abs']:.2g} | {int8_cell} | "
            f"{fp32['rolled_back']} | {g} | {why} |")


_ANSI = re.compile(r"\x1b\[[0-9;]*m|\[[0-9;]*m(?=\w)")


def _cell(text: str) -> str:
    text = _ANSI.sub("", str(text))
    text = re.sub(r"/tmp/llmopt-coverage-\w+/", "", text)  # the row's scratch directory
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def main() -> None:
    from llmopt.models.architectures import ARCHITECTURES, EXTRA

    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default=",".join(ARCHITECTURES + tuple(EXTRA)))
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--resume", action="store_true", help="skip rows already in benchmarks/results/coverage.json "
                                                          "(rows not in this run are always kept)")
    ap.add_argument("--out", default=str(REPO / "docs" / "coverage.md"))
    ap.add_argument("--markdown-only", action="store_true")
    ap.add_argument("--row", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.row:
        arch, form, tmp = a.row
        print(json.dumps(run_row(arch, form, Path(tmp)), default=str))
        return
    if a.markdown_only:
        data = json.loads(JSON_PATH.read_text())
    else:
        data = sweep(a.archs.split(","), a.forms.split(","), a.resume)
    Path(a.out).write_text(markdown(data))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

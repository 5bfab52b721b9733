"""`llmopt compile`: source model → pipeline → artifact directory, verified.

The artifact is built in a temporary sibling directory and renamed into place
only when everything (including verification) succeeded, so a failed compile
leaves nothing half-written and the input is never touched.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from llmopt import __version__
from llmopt.core import model_io, graph_util
from llmopt.core import atomic
from llmopt.compiler import genai, preflight
from llmopt.ort import machine, verify
from llmopt.ort import sessions
from llmopt.ort.calibration import SOURCE_DIR_KEY
from llmopt.errors import InputError, VerificationError
from llmopt.compiler.gates import GateError, Gates
from llmopt.frontend.inspector import kv_cache_info
from llmopt.core.manager import PassManager, check_explain
from llmopt.quant.spec import QUANT_ERROR_KEY
from llmopt.core.pipeline import Pipeline, load_recipe, parse
from llmopt.core.plugins import load_plugin_file
from llmopt.core.registry import get_target
from llmopt.core.atomic import write_atomic
from llmopt.reporting.files import load_json

MANIFEST = "llmopt.json"
SCHEMA = "llmopt/compile-report/v1"  # llmopt/schemas/compile-report.v1.json; bump on an incompatible change


@dataclasses.dataclass
class Artifact:
    """A compiled model directory and its manifest."""

    path: Path
    report: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / model_io.MODEL_FILE

    @property
    def size_ratio(self) -> float | None:
        """Artifact bytes (graph + weights) over source bytes."""
        return self.report["artifact"]["size_ratio"]

    @property
    def speedup(self) -> float | None:
        """Single-token latency, source over compiled (median of alternating pairs), if measured."""
        return (self.report.get("speed") or {}).get("speedup")

    @property
    def perplexity_change(self) -> float | None:
        """Compiled perplexity over the source's, minus 1, if an eval text was given."""
        return (self.report.get("accuracy") or {}).get("perplexity_change")

    @property
    def gates(self) -> list[dict[str, Any]]:
        return self.report.get("gates", [])

    def to_dict(self) -> dict[str, Any]:
        """The manifest (llmopt.json), which is what `llmopt compile --json` prints."""
        return self.report

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Artifact":
        p = Path(path)
        manifest = p / MANIFEST
        if not manifest.is_file():
            raise InputError(f"{p}: not an llmopt artifact (no {MANIFEST}); compile a model into it first")
        return cls(p, load_json(manifest, "recompile the artifact"))


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def override_thresholds(base: verify.Thresholds, overrides: dict[str, float]) -> verify.Thresholds:
    """The target's thresholds with some replaced (e.g. a CI job's stricter budget)."""
    known = {f.name for f in dataclasses.fields(verify.Thresholds)}
    ranges = {"max_abs": (0.0, math.inf), "min_cosine": (-1.0, 1.0), "min_top1": (0.0, 1.0)}
    for key, value in overrides.items():
        if key not in known:
            raise InputError(f"unknown threshold '{key}'; use one of {', '.join(sorted(known))}")
        lo, hi = ranges[key]
        if not (math.isfinite(float(value)) or value == math.inf and key == "max_abs") or not lo <= float(value) <= hi:
            raise InputError(f"--threshold {key}={value}: must be a number in [{lo:g}, {hi:g}]")
    return dataclasses.replace(base, **{k: float(v) for k, v in overrides.items()})


def resolve_pipeline(target, passes: str | None, recipe: str | os.PathLike | None) -> Pipeline:
    if passes is not None and recipe is not None:
        raise InputError("give --passes or --recipe, not both")
    if passes is not None:
        return parse(passes)
    if recipe is not None:
        return load_recipe(recipe)
    return target.parsed_pipeline()


def compile(  # noqa: A001 - the public name users expect
    model: str | os.PathLike,
    target: str = "cpu-int8",
    out: str | os.PathLike | None = None,
    *,
    passes: str | None = None,
    recipe: str | os.PathLike | None = None,
    verify_model: bool = True,
    verify_each: bool = False,
    with_past: bool = True,
    eval_text: str | os.PathLike | None = None,
    eval_tokens: int = 8192,
    measure_speed: bool = True,
    speed_pairs: int = 15,
    report_path: str | os.PathLike | None = None,
    thresholds: dict[str, float] | None = None,
    progress: Callable[[str], None] | None = None,
    explain: tuple[str, ...] | list[str] = (),
    max_ppl_increase: float | None = None,
    min_speedup: float | None = None,
    plugins: Sequence[str | os.PathLike] = (),
    check_plugins: bool = True,
) -> Artifact:
    """Compile ``model`` (an .onnx file, a directory holding one, or a Hugging Face model
    directory, exported first) for ``target`` into the directory ``out``.

    ``explain`` names passes (e.g. ``["fuse"]``) that should record why their rules did not fire;
    the report holds it under each pass's ``explanations``.

    Gates (for CI): ``max_ppl_increase`` (a fraction: 0.01 = 1%; needs ``eval_text`` or a model
    directory with eval.txt) and ``min_speedup`` (single-token latency, source over compiled).
    ``plugins``: Python files whose passes to register (like ``--plugin``); plugin passes are
    checked after they run unless ``check_plugins`` is false (see ``llmopt.core.plugins``).

    Raises ``VerificationError`` (exit code 1 on the CLI) when the compiled model misses
    the target's thresholds and ``GateError`` (a VerificationError) when it misses a gate: the
    artifact is then not written, the report still is (to ``report_path`` if given, and on the
    exception's ``report``). ``PluginError`` (exit code 1) when a plugin pass fails: the pipeline
    stopped, so there is no report, only the error naming the pass (and a reproducer file).
    """
    started = time.perf_counter()
    gates = Gates(max_ppl_increase, min_speedup)
    for plugin in plugins:
        load_plugin_file(plugin)
    tgt = get_target(target)
    if thresholds:
        tgt = dataclasses.replace(tgt, thresholds=override_thresholds(tgt.thresholds, thresholds))
    pipeline = resolve_pipeline(tgt, passes, recipe)
    pipeline.validate()  # unknown passes/options fail before any work
    check_explain(pipeline, explain)  # before any export or load
    from llmopt.frontend.exporter import resolve_hf_dir

    hf_dir = resolve_hf_dir(model)
    if eval_text is None and hf_dir is not None and (hf_dir / "eval.txt").is_file() and (hf_dir / "tokenizer.json").is_file():
        eval_text = hf_dir / "eval.txt"
    gates.require(has_eval_text=eval_text is not None, measure_speed=measure_speed)
    out = Path(out) if out is not None else Path(f"{Path(model).name.removesuffix('.onnx')}-{tgt.name}")
    source = _open_source(model, hf_dir)  # validates the ONNX file (external data included); reads no weights
    _preflight(source, hf_dir, eval_text, plugins, recipe, out, report_path)
    work = atomic.work_dir()
    try:
        report = _compile(
            model, hf_dir, source, tgt, pipeline, out, work,
            verify_model=verify_model, verify_each=verify_each, with_past=with_past,
            eval_text=eval_text, eval_tokens=eval_tokens, measure_speed=measure_speed,
            speed_pairs=speed_pairs, progress=progress, started=started, explain=tuple(explain),
            gates=gates, check_plugins=check_plugins,
        )
    except VerificationError as exc:
        if report_path and exc.report is not None:
            _write_json(Path(report_path), exc.report)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if report_path:
        _write_json(Path(report_path), report)
    return Artifact(out, json.loads(json.dumps(report, default=str)))  # exactly what llmopt.json holds


@dataclasses.dataclass
class _Source:
    """An ONNX source, opened: its file, the IR (weights memory-mapped) and every file it reads."""

    file: Path
    model: Any
    files: list[Path]


def _open_source(model, hf_dir) -> _Source | None:
    if hf_dir is not None:
        return None  # exported later, into the work directory
    src_file = model_io.resolve_model_file(model)
    ir_model = model_io.load(src_file)
    return _Source(src_file, ir_model, model_io.model_files(src_file, ir_model))


def _preflight(source, hf_dir, eval_text, plugins, recipe, out: Path, report_path) -> None:
    """Every path the compile reads or writes, checked before any export or pass (llmopt.compiler.preflight);
    then what killed earlier runs left at those places is swept away."""
    if source is not None:
        inputs = [("model", source.file)] + [("external data", f) for f in source.files[1:]]
    else:
        inputs = preflight.directory_inputs("model file", hf_dir)
    inputs += [("plugin", Path(p)) for p in plugins] + ([("recipe", Path(recipe))] if recipe is not None else [])
    if eval_text is not None:
        inputs.append(("eval text", preflight.check_text(eval_text, "--eval-text")))
        tok_dir = hf_dir if hf_dir is not None else source.file.parent
        if not (tok_dir / "tokenizer.json").is_file():
            raise InputError(f"{tok_dir.resolve()}: no tokenizer.json to tokenize --eval-text with; "
                             "put the model's tokenizer.json next to the model")
    outputs = [preflight.Output("-o", out, "dir", artifact=True)]
    if report_path is not None:
        outputs.append(preflight.Output("--report", Path(report_path)))
    preflight.check(inputs, outputs)
    for o in outputs:
        atomic.sweep(o.path)
    atomic.sweep_work_dirs()


def _compile(model_arg, hf_dir, source, tgt, pipeline, out, work, *, verify_model, verify_each, with_past,
             eval_text, eval_tokens, measure_speed, speed_pairs, progress, started, explain, gates,
             check_plugins) -> dict[str, Any]:
    source_info: dict[str, Any]
    if hf_dir is not None:
        from llmopt.frontend.exporter import export

        _log(progress, f"export  {hf_dir} (torch.onnx dynamo{', with KV cache I/O' if with_past else ''})")
        t0 = time.perf_counter()
        src_file = export(hf_dir, work / "source" / model_io.MODEL_FILE, with_past=with_past)
        hashed = sorted(f for f in hf_dir.iterdir() if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"))
        source_info = {
            "kind": "huggingface",
            "path": str(hf_dir),
            "sha256": model_io.sha256_files(hashed),
            "hashed_files": [f.name for f in hashed],
            "export": {"with_past": with_past, "seconds": round(time.perf_counter() - t0, 2)},
        }
        ir_model = model_io.load(src_file)  # weights stay memory-mapped
        src_files = model_io.model_files(src_file, ir_model)
    else:
        src_file, ir_model, src_files = source.file, source.model, source.files
        source_info = {"kind": "onnx", "path": str(src_file), "sha256": model_io.sha256_files(src_files)}
    source_info["bytes"] = model_io.files_bytes(src_files)

    _log(progress, f"load    {src_file.name} ({model_io.files_bytes(src_files) / 1e6:.1f} MB, weights memory-mapped)")
    total = len(pipeline.pass_specs())

    def on_start(i, spec):
        _log(progress, f"pass    [{i}/{total}{'+' if i > total else ''}] {spec}")

    def on_end(i, rec):
        counters = ", ".join(f"{k}={v}" for k, v in rec.counters.items() if v) or "no change"
        _log(progress, f"        {rec.nodes_before}→{rec.nodes_after} nodes, {rec.seconds:.2f}s, {counters}")

    source_nodes = graph_util.node_count(ir_model)
    source_ops = graph_util.op_histogram(ir_model)
    manager = PassManager(
        pipeline, verify_each=verify_each, thresholds=tgt.thresholds, on_start=on_start, on_end=on_end,
        source=str(model_arg), explain=explain, check_plugins=check_plugins,
    )
    source_dir = hf_dir if hf_dir is not None else Path(src_file).parent  # where a tokenizer/config may be
    ir_model.metadata_props[SOURCE_DIR_KEY] = str(source_dir)
    try:
        result = manager.run(ir_model)
    finally:
        ir_model.metadata_props.pop(SOURCE_DIR_KEY, None)  # a local path: not part of the artifact
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic.staging_path(out)
    try:
        _log(progress, f"save    {out}/ (external data)")
        model_io.save(result.model, staging / model_io.MODEL_FILE)
        cfg = genai.hf_config(source_dir)
        tokenizer = genai.copy_tokenizer([source_dir], staging)
        generation = genai.generation_info(result.model, cfg)
        if generation is not None:
            generation["tokenizer"] = bool(tokenizer)
            gcfg = genai.genai_config(result.model, cfg, tgt.provider)
            if gcfg is not None:
                _write_json(staging / genai.GENAI_CONFIG, gcfg)
        files = {f.name: f.stat().st_size for f in sorted(staging.iterdir())}
        artifact_bytes = sum(size for name, size in files.items() if name.startswith(model_io.MODEL_FILE))  # the graph + weights
        report: dict[str, Any] = {
            "schema": SCHEMA,
            "llmopt_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpu": machine.cpu_model()},
            "target": tgt.as_dict(),
            "provider": tgt.provider,
            "session_options": dict(tgt.session_options),
            "source": source_info,
            "pipeline": str(pipeline),
            "passes": [r.as_dict() for r in result.records],
            "warnings": result.warnings,
            "constraints": io_constraints(result.model),
            "io": graph_util.io_signature(result.model),
            "kv_cache": kv_cache_info(result.model),
            "generation": generation,
            "sparsity": json.loads(result.model.metadata_props.get("llmopt.sparsity", "null")),
            "quantization_error": json.loads(result.model.metadata_props.get(QUANT_ERROR_KEY, "null")),
            "artifact": {
                "files": files,
                "bytes": artifact_bytes,
                "size_ratio": round(artifact_bytes / source_info["bytes"], 4) if source_info["bytes"] else None,
                "nodes": graph_util.node_count(result.model),
                "source_nodes": source_nodes,
                "ops": graph_util.op_histogram(result.model),
                "source_ops": source_ops,
            },
            "verification": None,
            "speed": None,
            "accuracy": None,
            "gates": [],
        }
        unsupported = tgt.unsupported_ops(result.model)
        if unsupported:
            raise VerificationError(
                f"the compiled graph holds ops {tgt.provider} does not implement: {', '.join(unsupported)}; "
                f"nothing was written (they would run on the CPU provider, copying data every step)", report)
        del result, ir_model
        compiled_file = staging / model_io.MODEL_FILE
        if verify_model:
            _log(progress, f"verify  source vs compiled in ONNX Runtime ({', '.join(tgt.verify_providers)})")
            ver = verify.verify_files(src_file, compiled_file, tgt.thresholds, tgt.verify_providers,
                                      config=tgt.verify_session_config)
            report["verification"] = ver.as_dict()
        if measure_speed or eval_text:
            _measure(report, model_io.load(src_file), src_file, compiled_file, tgt, eval_text, eval_tokens, hf_dir,
                     measure_speed, speed_pairs, progress)
        if verify_model and not report["verification"]["passed"]:
            misses = "; ".join(report["verification"]["misses"])
            raise VerificationError(
                f"compiled model misses the {tgt.name} accuracy budget: {misses}; "
                "nothing was written (loosen the pipeline, or see --verify-each for the pass at fault)",
                report,
            )
        report["gates"] = gates.evaluate(report)
        missed = [g["text"] for g in report["gates"] if not g["passed"]]
        if missed:
            raise GateError(f"compiled model misses its gate{'s' if len(missed) > 1 else ''}: {'; '.join(missed)}; "
                            "nothing was written (the report says by how much)", report)
        report["seconds"] = round(time.perf_counter() - started, 2)
        _write_json(staging / MANIFEST, report)
        atomic.publish_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def io_constraints(model) -> list[str]:
    """What callers of the compiled graph must respect beyond its signature."""
    notes = []
    if any(n.op_type == "GroupQueryAttention" for n in model.graph):
        notes.append(
            "GroupQueryAttention: sequence lengths are read from attention_mask's sum, so padding must be on "
            "the right; a step with several new tokens and a non-empty cache must have batch 1"
        )
    return notes


def _measure(report, src_model, src_file, compiled_file, tgt, eval_text, eval_tokens, hf_dir,
             measure_speed, speed_pairs, progress) -> None:
    from llmopt.ort import timing

    src_sess = sessions.make_session(src_file, threads=2)
    out_sess = sessions.make_session(compiled_file, tgt.verify_providers, threads=2)
    if measure_speed:
        _log(progress, f"speed   single-token latency, source vs compiled, {speed_pairs} alternating pairs")
        if verify.has_past_inputs(src_model) or not report.get("kv_cache"):
            feeds = timing.decode_feeds(src_model)
            r = timing.compare_sessions(src_sess, out_sess, feeds, pairs=speed_pairs)
            what = "single-token latency" + (" after 128 cached tokens" if verify.has_past_inputs(src_model) else "")
        else:  # kv-cache added a cache: the next token is a full recompute vs one cached step
            compiled = model_io.load(compiled_file)
            limit = json.loads(compiled.metadata_props.get("llmopt.kv_cache", "{}")).get("max_length", 4096)
            ctx = min(128, limit - 1)
            r = timing.compare_sessions_feeds(src_sess, timing.recompute_feeds(src_model, ctx), out_sess,
                                              timing.decode_feeds(compiled, past=ctx), pairs=speed_pairs)
            what = f"next token after {ctx}: source recomputes {ctx + 1} tokens, compiled reads its KV cache"
        report["speed"] = {
            "what": what,
            "provider": tgt.verify_providers[0],
            "threads": 2,
            "source_ms": round(r["a_ms"], 3),
            "compiled_ms": round(r["b_ms"], 3),
            "speedup": round(r["ratio"], 3),
            "speedup_min": round(r["ratio_min"], 3),
            "speedup_max": round(r["ratio_max"], 3),
            "pairs": r["pairs"],
        }
    if eval_text:
        from llmopt.ort import perplexity as ppl

        tok_dir = hf_dir if hf_dir is not None else Path(src_file).parent
        _log(progress, f"eval    perplexity on {eval_text} (first {eval_tokens} tokens)")
        ids = ppl.tokenize_file(ppl.load_tokenizer(tok_dir), eval_text, eval_tokens)
        src_ppl = ppl.perplexity(src_sess, ids)
        out_ppl = ppl.perplexity(out_sess, ids)
        report["accuracy"] = {
            "text": str(eval_text),
            "tokens": out_ppl["tokens"],
            "source_perplexity": round(src_ppl["perplexity"], 4),
            "compiled_perplexity": round(out_ppl["perplexity"], 4),
            "perplexity_change": round(out_ppl["perplexity"] / src_ppl["perplexity"] - 1, 5),
        }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")

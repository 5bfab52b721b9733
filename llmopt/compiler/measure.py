"""Measure: the staged artifact run in ONNX Runtime against its source, the figures put in the
manifest: ``verification`` (logits vs the target's thresholds), ``speed`` (single-token latency,
alternating pairs) and ``accuracy`` (perplexity on the eval text).

Sessions on the compiled model are made as the target says: on its ``verify_providers``, with its
``session_options`` (``artifact_session``) for speed and perplexity, and with its
``verify_session_config`` for the verification (``llmopt.ort.verify``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmopt.compiler.plan import Plan
from llmopt.core import model_io
from llmopt.ort import sessions, verify

THREADS = 2  # both models, when timed and when evaluated


def artifact_session(target, path: Path, threads: int | None = None):
    """An ONNX Runtime session on a compiled model as ``target`` runs it: its first verify provider
    (a CPU stand-in for a GPU target) and its ``session_options``."""
    return sessions.make_session(path, target.verify_providers, threads=threads, **target.session_kwargs())


def run_all(plan: Plan, src_file: Path, compiled_file: Path, manifest: dict[str, Any]) -> None:
    """Every measurement the options ask for, each into its manifest section."""
    options, target = plan.options, plan.target
    if options.verify_model:
        options.log(f"verify  source vs compiled in ONNX Runtime ({', '.join(target.verify_providers)})")
        manifest["verification"] = verify.verify_files(src_file, compiled_file, target.thresholds, target.verify_providers,
                                                       config=target.verify_session_config).as_dict()
    if not (options.measure_speed or plan.eval_text):
        return
    src_sess = sessions.make_session(src_file, threads=THREADS)
    out_sess = artifact_session(target, compiled_file, threads=THREADS)
    if options.measure_speed:
        manifest["speed"] = speed(plan, src_file, compiled_file, src_sess, out_sess, cached=bool(manifest.get("kv_cache")))
    if plan.eval_text:
        manifest["accuracy"] = perplexity(plan, src_sess, out_sess)


def speed(plan: Plan, src_file: Path, compiled_file: Path, src_sess, out_sess, cached: bool) -> dict[str, Any]:
    """Single-token latency, source vs compiled, in alternating pairs (the median ratio and its range)."""
    from llmopt.ort import timing

    pairs = plan.options.speed_pairs
    plan.options.log(f"speed   single-token latency, source vs compiled, {pairs} alternating pairs")
    src_model = model_io.load(src_file)
    src_past = verify.has_past_inputs(src_model)
    if src_past or not cached:
        r = timing.compare_sessions(src_sess, out_sess, timing.decode_feeds(src_model), pairs=pairs)
        what = "single-token latency" + (" after 128 cached tokens" if src_past else "")
    else:  # kv-cache added a cache: the next token is a full recompute vs one cached step
        compiled = model_io.load(compiled_file)
        limit = json.loads(compiled.metadata_props.get("llmopt.kv_cache", "{}")).get("max_length", 4096)
        ctx = min(128, limit - 1)
        r = timing.compare_sessions_feeds(src_sess, timing.recompute_feeds(src_model, ctx), out_sess,
                                          timing.decode_feeds(compiled, past=ctx), pairs=pairs)
        what = f"next token after {ctx}: source recomputes {ctx + 1} tokens, compiled reads its KV cache"
    return {
        "what": what,
        "provider": plan.target.verify_providers[0],
        "threads": THREADS,
        "source_ms": round(r["a_ms"], 3),
        "compiled_ms": round(r["b_ms"], 3),
        "speedup": round(r["ratio"], 3),
        "speedup_min": round(r["ratio_min"], 3),
        "speedup_max": round(r["ratio_max"], 3),
        "pairs": r["pairs"],
    }


def perplexity(plan: Plan, src_sess, out_sess) -> dict[str, Any]:
    """Perplexity of source and compiled on the same tokens of the eval text (the source's tokenizer)."""
    from llmopt.ort import perplexity as ppl

    text, tokens = plan.eval_text, plan.options.eval_tokens
    plan.options.log(f"eval    perplexity on {text} (first {tokens} tokens)")
    ids = ppl.tokenize_file(ppl.load_tokenizer(plan.source_dir), text, tokens)
    src_ppl = ppl.perplexity(src_sess, ids)
    out_ppl = ppl.perplexity(out_sess, ids)
    return {
        "text": str(text),
        "tokens": out_ppl["tokens"],
        "source_perplexity": round(src_ppl["perplexity"], 4),
        "compiled_perplexity": round(out_ppl["perplexity"], 4),
        "perplexity_change": round(out_ppl["perplexity"] / src_ppl["perplexity"] - 1, 5),
    }

"""The report's section on a bench report (`llmopt bench --json`): decode-step latency against position,
and the figures per model and batch. Bench report in, document blocks out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from llmopt.reporting.document import Cell, Lines, Note, Section, Table, cell
from llmopt.reporting.format import fmt_fixed, fmt_num, fmt_pct, fmt_ratio, human_bytes, sparkline
from llmopt.reporting.manifest import bench_batches


def ratio_notes(bench: dict, fmt: Callable[[float | None], str] = fmt_ratio) -> list[str]:
    """One line per batch measured against a baseline: the artifact's decode and prefill speedups."""
    return [f"batch {batch}: artifact vs baseline decode {fmt(r.get('decode_speedup'))}, "
            f"prefill {fmt(r.get('prefill_speedup'))} (medians of per-run ratios)"
            for batch, r in (bench.get("ratios") or {}).items()]


def latency(bench: dict | None, artifact_dir: str | None = None) -> Section:
    title = "Latency per token vs position"
    if bench is None:
        return Section("latency", title, [Note(
            "No bench report given. Measure one with `llmopt bench ART --json > bench.json`, then render this "
            "report with `llmopt report ART --bench bench.json` to plot decode-step latency against position.", "muted")])
    s = bench.get("settings") or {}
    start = int(s.get("prompt_len") or 0)
    series = []
    rows: list[list[Cell | str]] = []
    for key, mod, batch, b in bench_batches(bench):
        steps = [float(x) for x in (b.get("steps_ms_last_run") or [])]
        if steps:
            series.append((f"{key}, batch {batch}", list(range(start, start + len(steps))), steps))
        rows.append([
            cell(key), cell(batch, "num"), cell(f"{mod.get('loop', '?')}, {mod.get('kv_buffer', '?')}", "small"),
            cell(fmt_num(mod.get("load_s_median"), 3), "num"),
            cell(fmt_fixed(b.get("prefill_tokens_per_s"), 0), "num"),
            cell(fmt_fixed(b.get("decode_tokens_per_s"), 0), "num"),
            cell(f"{fmt_num(b.get('step_ms_p50'))} / {fmt_num(b.get('step_ms_p90'))}", "num"),
            cell(human_bytes(b.get("kv_cache_bytes")), "num"),
            cell(fmt_pct(b.get("roofline_fraction"), False, 0), "num"),
            cell(sparkline(steps), "spark"),
        ])
    blocks: list[Any] = []
    measured = ((bench.get("models") or {}).get("artifact") or {}).get("path")
    if measured and artifact_dir is not None and _same_path(measured, artifact_dir) is False:
        blocks.append(Note(f"This bench report measured {measured}, not {artifact_dir}.", "warn"))
    blocks.append(Note(
        f"Prompt {s.get('prompt_len', '?')} tokens, {s.get('new_tokens', '?')} new tokens, batches "
        f"{', '.join(str(x) for x in s.get('batches') or []) or '?'}, {s.get('threads', '?')} threads, "
        f"{s.get('repeats', '?')} repeats; memory bandwidth {bench.get('memory_bandwidth_gbs', '?')} GB/s. "
        "Each line is the last run's decode steps; the first step is at the prompt length.", "muted"))
    if series:
        blocks.append(Lines(series, "position (tokens in the cache)", "ms per decode step", "decode step latency"))
    else:
        blocks.append(Note("The bench report has no per-step latencies (steps_ms_last_run).", "warn"))
    blocks.append(Table(["model", "batch", "loop, KV buffer", "load s", "prefill tok/s", "decode tok/s",
                         "step ms p50 / p90", "KV cache", "roofline", "steps"], rows, "lrlrrrrrrl"))
    blocks += [Note(text) for text in ratio_notes(bench)]
    if bench.get("peak_rss_bytes") is not None:
        blocks.append(Note(f"Peak RSS of the bench process: {human_bytes(bench['peak_rss_bytes'])}.", "muted"))
    return Section("latency", title, blocks)


def _same_path(a: str, b: str) -> bool | None:
    """Whether the bench measured this artifact (its directory or its model.onnx); None when unknown."""
    try:
        pa, pb = Path(a).resolve(), Path(b).resolve()
    except OSError:
        return None
    return pa == pb or pa == pb / "model.onnx"

"""The human-readable compile report (what `llmopt compile` prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmopt.reporting.format import fmt_fixed, fmt_num, fmt_pct, human_bytes


def format_compile_report(r: dict[str, Any], path: Path) -> str:
    a = r["artifact"]
    lines = [f"compiled {r['source']['path']} -> {path}/ for {r['target']['name']} ({r['provider']}) in {r['seconds']}s"]
    lines.append(
        f"  size      {human_bytes(a['bytes'])} vs {human_bytes(r['source']['bytes'])} source "
        f"({fmt_fixed(a['size_ratio'], 3, 'x')}); nodes {a['source_nodes']} -> {a['nodes']}"
    )
    moe = a.get("experts")
    if moe:
        fused = sum(v for k, v in a["ops"].items() if k in ("com.microsoft::MoE", "com.microsoft::QMoE"))
        lines.append(
            f"  experts   {moe['blocks']} blocks of {'/'.join(map(str, moe['experts']))} experts, top-"
            f"{'/'.join(map(str, moe['k'])) or '?'}, {fused} fused; a token reads {human_bytes(moe['active_bytes'])} "
            f"of the {human_bytes(moe['total_bytes'])} of weights"
        )
    s = r.get("speed")
    if s:
        lines.append(
            f"  speed     {fmt_fixed(s['speedup'], 2, 'x')} speedup, {s['what']} "
            f"({fmt_fixed(s['source_ms'])} -> {fmt_fixed(s['compiled_ms'])} ms, median of {s['pairs']} alternating pairs, "
            f"range {fmt_fixed(s['speedup_min'])}-{fmt_fixed(s['speedup_max'], 2, 'x')}, "
            f"{s['threads']} threads{_on_other_provider(s, r)})"
        )
    v = r.get("verification")
    if v:
        f = v["figures"]
        status = "PASS" if v["passed"] else "FAIL: " + "; ".join(v["misses"])
        lines.append(
            f"  verify    {status} - logits max-abs {fmt_num(f['max_abs'], 3)}, cosine {fmt_fixed(f['cosine'], 6)}, "
            f"top-1 agreement {fmt_fixed(f['top1'], 3)}"
        )
    else:
        lines.append("  verify    skipped (--no-verify)")
    acc = r.get("accuracy")
    if acc:
        lines.append(
            f"  accuracy  perplexity {fmt_fixed(acc['source_perplexity'], 3)} -> {fmt_fixed(acc['compiled_perplexity'], 3)} "
            f"({fmt_pct(acc['perplexity_change'])}) on {acc['tokens']} tokens of {Path(acc['text']).name}"
        )
    for g in r.get("gates", []):
        lines.append(f"  gate      {'PASS' if g['passed'] else 'FAIL'} {g['gate']}: {g['text']}")
    for w in r.get("warnings", []):
        lines.append(f"  warning   {w}")
    for c in r.get("constraints", []):
        lines.append(f"  note      {c}")
    for rec in r.get("passes", []):
        entries = rec.get("explanations") or []
        quiet = [e for e in entries if e["status"] == "no partial match"]
        for e in sorted((e for e in entries if e not in quiet), key=lambda e: -e.get("matched_nodes", 0)):
            near = f" near {', '.join(e['near'])}" if e.get("near") else ""
            at = f" (best partial match at {e['at']}, {e['matched_nodes']} nodes{near})" if e.get("at") else ""
            lines.append(f"  explain   {rec['name']}/{e.get('stage', '')}: {e['rule']} did not fire - {e['status']}: {e['reason']}{at}")
        if quiet:
            lines.append(f"  explain   {rec['name']}: {len(quiet)} more rules matched nothing at all "
                         f"({', '.join(sorted({e['rule'] for e in quiet}))})")
    lines.append(f"  passes    {r['pipeline']}  (details: {path}/llmopt.json)")
    return "\n".join(lines)


def _on_other_provider(speed: dict, r: dict) -> str:
    """Say so when the timing ran on another provider than the target's (a CUDA target timed on the CPU)."""
    measured = speed.get("provider")
    if measured and measured != r.get("provider"):
        return f", on {measured}: not the target's {r.get('provider')}, a check that the graph runs, not its speed there"
    return ""

"""The report's sections on the compile itself: overview, summary (size, speed, accuracy, verification,
gates), warnings, the pass timeline and the op histogram. Manifest in, document blocks out."""

from __future__ import annotations

from typing import Any

from llmopt.reporting.document import Bars, Card, Cards, Cell, Items, Note, Section, Table, cell, num_cell, signed_cell
from llmopt.reporting.format import (fmt_bytes_delta, fmt_fixed, fmt_hash, fmt_num, fmt_pct, fmt_ratio, fmt_signed,
                                     human_bytes)


def split_op(op: str) -> tuple[str, str]:
    """'com.microsoft::GroupQueryAttention' -> ('GroupQueryAttention', 'com.microsoft')."""
    domain, sep, name = op.rpartition("::")
    return (name, domain) if sep else (op, "")


def overview(m: dict, artifact_dir: str | None) -> Section:
    t = m.get("target") if isinstance(m.get("target"), dict) else {"name": m.get("target")}
    src = m.get("source") or {}
    mach = m.get("machine") or {}
    a = m.get("artifact") or {}
    rows: list[list[Cell | str]] = [
        ["target", cell(f"{t.get('name', '?')}" + (f" — {t['description']}" if t.get("description") else ""))],
        ["provider", cell(m.get("provider") or t.get("provider") or "-", "code")],
    ]
    src_bits = [str(src.get("path", "-"))]
    extra = [str(src["kind"])] if src.get("kind") else []
    if src.get("bytes") is not None:
        extra.append(human_bytes(src["bytes"]))
    if src.get("sha256"):
        extra.append(f"sha256 {fmt_hash(src['sha256'])}…")
    rows.append(["source", cell(src_bits[0] + (f" ({', '.join(extra)})" if extra else ""), "code", str(src.get("sha256", "")))])
    if artifact_dir is not None:
        rows.append(["artifact", cell(artifact_dir, "code")])
    files = a.get("files") or {}
    if files:
        rows.append(["files", cell(", ".join(f"{k} {human_bytes(v)}" for k, v in files.items()), "code")])
    rows.append(["pipeline", cell(m.get("pipeline") or t.get("pipeline") or "-", "code")])
    rows.append(["created", cell(m.get("created", "-"))])
    if m.get("seconds") is not None:
        rows.append(["compile time", cell(f"{m['seconds']} s")])
    rows.append(["llmopt version", cell(m.get("llmopt_version", "-"))])
    if mach:
        rows.append(["machine", cell(" · ".join(str(mach[k]) for k in ("cpu", "platform") if mach.get(k))
                                     + (f" · Python {mach['python']}" if mach.get("python") else ""))])
    return Section("overview", "Overview", [Table(["", ""], rows, "ll")])


def summary(m: dict) -> Section:
    speed = m.get("speed") or None
    blocks: list[Any] = [_cards(m), _figures(m)]
    if speed and speed.get("what"):
        blocks.append(Note(f"Speed: {speed['what']}; median of {speed.get('pairs', '?')} alternating pairs, "
                           f"{speed.get('threads', '?')} threads.", "muted"))
    blocks += _verification(m.get("verification") or None)
    blocks += _gates(m.get("gates") or [])
    return Section("summary", "Summary: size, speed, accuracy", blocks)


def _cards(m: dict) -> Cards:
    """The headline figures: size ratio, speedup, perplexity change, verification."""
    a, src = m.get("artifact") or {}, m.get("source") or {}
    speed, acc, ver = m.get("speed") or None, m.get("accuracy") or None, m.get("verification") or None
    cards = []
    ratio = a.get("size_ratio")
    cards.append(Card("size", fmt_ratio(ratio),
                      f"{human_bytes(a.get('bytes'))} vs {human_bytes(src.get('bytes'))} source",
                      "good" if ratio is not None and ratio < 1 else ""))
    if speed:
        sp = speed.get("speedup")
        cards.append(Card("single-token speedup", fmt_ratio(sp),
                          f"{fmt_num(speed.get('source_ms'))} → {fmt_num(speed.get('compiled_ms'))} ms",
                          "good" if sp and sp > 1 else "bad" if sp and sp < 1 else ""))
    else:
        cards.append(Card("single-token speedup", "-", "not measured (compile with speed measurement)", "muted"))
    if acc:
        ch = acc.get("perplexity_change")
        cards.append(Card("perplexity change", fmt_pct(ch),
                          f"{fmt_num(acc.get('source_perplexity'))} → {fmt_num(acc.get('compiled_perplexity'))}",
                          "good" if ch is not None and ch <= 0.01 else "bad" if ch is not None and ch > 0.05 else ""))
    else:
        cards.append(Card("perplexity change", "-", "not measured (compile with --eval-text)", "muted"))
    if ver:
        f = ver.get("figures") or {}
        cards.append(Card("verification", _verdict(ver.get("passed")),
                          f"cosine {fmt_num(f.get('cosine'), 6)}, top-1 {fmt_num(f.get('top1'))}",
                          "pass" if ver.get("passed") else "fail"))
    else:
        cards.append(Card("verification", "skipped", "compiled with --no-verify", "muted"))
    return Cards(cards)


def _figures(m: dict) -> Table:
    """Source vs artifact: size, nodes, KV cache, latency, perplexity."""
    a, src = m.get("artifact") or {}, m.get("source") or {}
    speed, acc, kv = m.get("speed") or None, m.get("accuracy") or None, m.get("kv_cache") or None
    ratio = a.get("size_ratio")
    rows: list[list[Cell | str]] = []
    sb, ab = src.get("bytes"), a.get("bytes")
    rows.append(["size (graph + weights)", cell(human_bytes(sb), "num"), cell(human_bytes(ab), "num"),
                 cell(fmt_ratio(ratio), "num good" if ratio is not None and ratio < 1 else "num")])
    sn, an = a.get("source_nodes"), a.get("nodes")
    if an is not None:
        d = an - sn if sn is not None else None
        pct = f" ({fmt_pct(d / sn, decimals=0)})" if d is not None and sn else ""
        change = num_cell(signed_cell(d, fmt_signed(d) + pct if d is not None else None))
        rows.append(["nodes", cell(fmt_num(sn), "num"), cell(fmt_num(an), "num"), change])
    if kv:
        rows.append(["KV cache per token", cell("-", "num"), cell(human_bytes(kv.get("bytes_per_token")), "num"),
                     cell(f"{kv.get('layers', '?')} layers × {kv.get('kv_heads', '?')} heads × {kv.get('head_dim', '?')}, "
                          f"{kv.get('dtype', '?')}", "muted")])
    if speed:
        sp = speed.get("speedup")
        rng = ""
        if speed.get("speedup_min") is not None:
            rng = f" ({fmt_num(speed.get('speedup_min'), 3)}–{fmt_num(speed.get('speedup_max'), 3)})"
        rows.append(["single-token latency (ms)", cell(fmt_num(speed.get("source_ms")), "num"),
                     cell(fmt_num(speed.get("compiled_ms")), "num"),
                     cell(f"{fmt_ratio(sp)} speedup{rng}", "num " + ("good" if sp and sp > 1 else "bad" if sp else ""))])
    else:
        rows.append(["single-token latency (ms)", cell("-", "num"), cell("-", "num"), cell("not measured", "muted")])
    if acc:
        ch = acc.get("perplexity_change")
        rows.append([f"perplexity ({acc.get('tokens', '?')} tokens)", cell(fmt_num(acc.get("source_perplexity")), "num"),
                     cell(fmt_num(acc.get("compiled_perplexity")), "num"),
                     cell(fmt_pct(ch), "num " + ("bad" if ch and ch > 0 else "good" if ch is not None else ""))])
    else:
        rows.append(["perplexity", cell("-", "num"), cell("-", "num"), cell("not measured (--eval-text)", "muted")])
    return Table(["", "source", "artifact", "change"], rows, "lrrr")


def _verification(ver: dict | None) -> list[Any]:
    """Each verification figure against its threshold, and the misses."""
    if not ver:
        return [Note("Verification was skipped (--no-verify): the compiled logits were not compared with the "
                     "source's.", "warn")]
    f = ver.get("figures") or {}
    th = ver.get("thresholds") or {}
    limits = {"max_abs": ("max_abs", "≤"), "cosine": ("min_cosine", "≥"), "top1": ("min_top1", "≥")}
    names = {"max_abs": "logits max |Δ|", "mean_abs": "logits mean |Δ|", "cosine": "logits cosine",
             "top1": "top-1 agreement", "other_max_abs": "other outputs max |Δ| (e.g. present KV)"}
    rows: list[list[Cell | str]] = []
    for key, val in f.items():
        lim_key, op = limits.get(key, (None, ""))
        lim = th.get(lim_key) if lim_key else None
        if lim is None:
            res = cell("-", "muted")
        else:
            ok = val <= lim if op == "≤" else val >= lim
            res = cell("ok" if ok else "miss", "pass" if ok else "fail")
        rows.append([names.get(key, key), cell(fmt_num(val, 6), "num"),
                     cell(f"{op} {fmt_num(lim, 6)}" if lim is not None else "-", "num"), res])
    table = Table(["verification figure", "value", "threshold", "result"], rows, "lrrl",
                  caption=f"Verification: {_verdict(ver.get('passed'))} "
                          f"on {ver.get('provider', '?')}, {len(ver.get('samples') or [])} samples")
    return [table] + [Note(f"miss: {miss}", "fail") for miss in ver.get("misses") or []]


def _gates(gates: list[dict]) -> list[Table]:
    if not gates:
        return []
    rows: list[list[Cell | str]] = [
        [g["gate"], cell(fmt_num(g.get("value")), "num"), cell(fmt_num(g.get("limit")), "num"),
         cell(_verdict(g["passed"]), _verdict(g["passed"]).lower()), g.get("text", "")]
        for g in gates]
    return [Table(["gate", "measured", "limit", "result", ""], rows, "lrrll",
                  caption=f"Gates: {'all passed' if all(g['passed'] for g in gates) else 'MISSED'}")]


def _verdict(passed: Any) -> str:
    return "PASS" if passed else "FAIL"


def warnings(m: dict) -> Section:
    blocks: list[Any] = []
    warns = [str(w) for w in m.get("warnings") or []]
    constraints = [str(c) for c in m.get("constraints") or []]
    if warns:
        blocks.append(Items(warns, "warn"))
    else:
        blocks.append(Note("No warnings.", "muted"))
    if constraints:
        blocks.append(Note("Constraints callers of the compiled graph must respect:"))
        blocks.append(Items(constraints, "note"))
    else:
        blocks.append(Note("No constraints beyond the I/O signature.", "muted"))
    return Section("warnings", f"Warnings ({len(warns)}) and constraints ({len(constraints)})", blocks)


def passes(m: dict) -> Section:
    records = [p for p in m.get("passes") or [] if isinstance(p, dict)]
    if not records:
        return Section("passes", "Pass timeline", [Note("The manifest records no passes.", "muted")])
    has_verify = any(p.get("verify") for p in records)
    rows: list[list[Cell | str]] = []
    total = sum(float(p.get("seconds") or 0) for p in records)
    labels, values, texts = [], [], []
    for i, p in enumerate(records, 1):
        name = str(p.get("name", "?")) + (f" (iteration {p['iteration']})" if p.get("iteration") is not None else "")
        secs = float(p.get("seconds") or 0)
        nb, na = p.get("nodes_before"), p.get("nodes_after")
        bb, ba = p.get("bytes_before"), p.get("bytes_after")
        dn = na - nb if na is not None and nb is not None else None
        db = ba - bb if ba is not None and bb is not None else None
        counters = ", ".join(f"{k}={v}" for k, v in (p.get("counters") or {}).items() if v) or (
            "modified" if p.get("modified") else "no change")
        opts = ", ".join(f"{k}={v}" for k, v in (p.get("options") or {}).items())
        row: list[Cell | str] = [
            cell(i, "num"), cell(name, "code nowrap" if p.get("modified") else "code nowrap muted", opts),
            cell(fmt_fixed(secs, 3), "num"), cell(fmt_pct(secs / total, False, 0) if total else "-", "num muted"),
            *_change_cells(nb, na, ba, dn, db),
            cell(counters, "small" if p.get("modified") else "small muted"),
        ]
        if has_verify:
            v = p.get("verify") or {}
            f = v.get("figures") or {}
            row.append(cell(f"cos {fmt_num(f.get('cosine'), 6)}, max|Δ| {fmt_num(f.get('max_abs'), 3)}" if f else "-",
                            "small " + ("fail" if v.get("misses") else "")))
        rows.append(row)
        labels.append(f"{i}. {name}")
        values.append(secs)
        texts.append(fmt_fixed(secs, 3, " s"))
    first, last = records[0], records[-1]
    dn = (last.get("nodes_after") or 0) - (first.get("nodes_before") or 0)
    db = (last.get("bytes_after") or 0) - (first.get("bytes_before") or 0)
    foot: list[Cell | str] = [
        "", "total", cell(fmt_fixed(total, 3), "num"), cell("100%" if total else "-", "num muted"),
        *_change_cells(first.get("nodes_before"), last.get("nodes_after"), last.get("bytes_after"), dn, db), "",
    ] + ([""] if has_verify else [])
    headers = ["#", "pass", "seconds", "share", "nodes", "Δ nodes", "weights", "Δ weights", "counters"]
    headers += ["verify-each"] if has_verify else []
    blocks: list[Any] = [
        Bars(labels, values, texts, unit="seconds", title="seconds per pass"),
        Table(headers, rows, "rlrrrrrrll", foot=foot),
        Note("Passes in pipeline order; 'weights' is initializer bytes after the pass. "
             "Hover a pass name for its options.", "muted"),
    ]
    return Section("passes", f"Pass timeline ({len(records)} passes, {fmt_fixed(total, 2, ' s')})", blocks)


def _change_cells(nodes_before: int | None, nodes_after: int | None, bytes_after: int | None, d_nodes: int | None,
                  d_bytes: int | None) -> list[Cell | str]:
    """A pass's (or the pipeline's) effect: nodes before → after, Δ nodes, weights after, Δ weights."""
    return [cell(f"{fmt_num(nodes_before)} → {fmt_num(nodes_after)}", "num"), num_cell(signed_cell(d_nodes)),
            cell(human_bytes(bytes_after), "num"), num_cell(signed_cell(d_bytes, fmt_bytes_delta(d_bytes)))]


def ops(m: dict) -> Section:
    a = m.get("artifact") or {}
    art_ops = a.get("ops") or {}
    src_ops = a.get("source_ops")
    if not art_ops and not src_ops:
        return Section("ops", "Op histogram", [Note("The manifest has no op histogram (compiled by an older llmopt).", "muted")])
    src_ops = src_ops or {}
    keys = sorted(set(art_ops) | set(src_ops), key=lambda k: (-max(art_ops.get(k, 0), src_ops.get(k, 0)), k))
    any_domain = any(split_op(k)[1] for k in keys)
    rows: list[list[Cell | str]] = []
    for k in keys:
        name, domain = split_op(k)
        s, t = src_ops.get(k, 0), art_ops.get(k, 0)
        d = t - s
        tag = " new" if s == 0 and a.get("source_ops") else " gone" if t == 0 else ""
        row: list[Cell | str] = [cell(name, "code")]
        if any_domain:
            row.append(cell(domain, "muted small"))
        row += [cell(s if a.get("source_ops") is not None else "-", "num"), cell(t, "num"),
                cell(fmt_signed(d) + tag, "num") if d else cell("0", "num muted")]
        rows.append(row)
    headers = ["op"] + (["domain"] if any_domain else []) + ["source", "artifact", "Δ"]
    foot: list[Cell | str] = ["total"] + ([""] if any_domain else []) + [
        cell(sum(src_ops.values()) if a.get("source_ops") is not None else "-", "num"), cell(sum(art_ops.values()), "num"), ""]
    changed = sum(1 for k in keys if art_ops.get(k, 0) != src_ops.get(k, 0))
    blocks = [Table(headers, rows, ("l" + ("l" if any_domain else "") + "rrr"), foot=foot),
              Note(f"{len(keys)} op types, {changed} with different counts; sorted by the larger of the two counts.", "muted")]
    return Section("ops", "Op histogram: source vs artifact", blocks)


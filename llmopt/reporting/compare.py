"""`llmopt compare A B`: two artifacts' manifests side by side (size, speed, accuracy, ops).

``compare_reports`` returns plain data (JSON-ready, for ``--json``); ``format_compare`` prints it
as an aligned text table. Ratios are B / A, deltas B - A; a value missing on either side is None
(printed as "-").
"""

from __future__ import annotations

import os
from typing import Any

from llmopt.reporting.format import ellipsize, fmt_hash, fmt_num, fmt_pct, fmt_pp, fmt_ratio, fmt_signed, human_bytes
from llmopt.reporting.manifest import check_manifest, get, is_number, target_name

# how a row's values read and how B relates to A
_RATIO, _DELTA, _SAME = "ratio", "delta", "same"


def _row(label: str, a: Any, b: Any, how: str, unit: str = "") -> dict[str, Any]:
    """One comparison row: ``ratio`` (B/A) for magnitudes, ``delta`` (B-A) for fractions and counts,
    ``same`` (true/false) for text."""
    row: dict[str, Any] = {"label": label, "a": a, "b": b, "unit": unit, "ratio": None, "delta": None, "same": None}
    numbers = is_number(a) and is_number(b)
    if how == _RATIO and numbers and a != 0:
        row["ratio"] = round(b / a, 6)
    elif how == _DELTA and numbers:
        d = b - a
        row["delta"] = d if isinstance(d, int) else round(d, 10)
    elif how == _SAME and a is not None and b is not None:
        row["same"] = a == b
    return row


def _check(m: Any, which: str) -> dict:
    return check_manifest(m, which, need=("artifact",))


def compare_reports(a: dict, b: dict) -> dict[str, Any]:
    """Rows comparing manifest ``a`` with manifest ``b``, and the ops whose counts differ.

    Returns ``{"rows": [{"label", "a", "b", "unit", "ratio", "delta", "same"}], "ops": [{"op", "a", "b", "delta"}]}``
    (``ops`` is None when a manifest has no op histogram);
    ``ratio`` is B/A (sizes, times, counts that scale), ``delta`` is B - A (fractions, figures near 1, warnings),
    ``same`` says whether text values match; the unused ones are None.
    """
    a, b = _check(a, "A"), _check(b, "B")
    rows = [
        _row("target", target_name(a), target_name(b), _SAME),
        _row("pipeline", a.get("pipeline"), b.get("pipeline"), _SAME),
        _row("source", get(a, "source", "path"), get(b, "source", "path"), _SAME),
        _row("source sha256", get(a, "source", "sha256"), get(b, "source", "sha256"), _SAME, "hash"),
        _row("artifact bytes", get(a, "artifact", "bytes"), get(b, "artifact", "bytes"), _RATIO, "bytes"),
        _row("size ratio vs source", get(a, "artifact", "size_ratio"), get(b, "artifact", "size_ratio"), _DELTA, "x"),
        _row("nodes", get(a, "artifact", "nodes"), get(b, "artifact", "nodes"), _DELTA),
        _row("single-token speedup", get(a, "speed", "speedup"), get(b, "speed", "speedup"), _RATIO, "x"),
        _row("source ms", get(a, "speed", "source_ms"), get(b, "speed", "source_ms"), _RATIO, "ms"),
        _row("compiled ms", get(a, "speed", "compiled_ms"), get(b, "speed", "compiled_ms"), _RATIO, "ms"),
        _row("perplexity", get(a, "accuracy", "compiled_perplexity"), get(b, "accuracy", "compiled_perplexity"), _RATIO),
        _row("perplexity change", get(a, "accuracy", "perplexity_change"), get(b, "accuracy", "perplexity_change"),
             _DELTA, "%"),
        _row("verification", _verdict(a), _verdict(b), _SAME),
    ]
    fa = get(a, "verification", "figures") or {}
    fb = get(b, "verification", "figures") or {}
    for key in list(fa) + [k for k in fb if k not in fa]:
        # errors scale (ratio); cosine and top-1 agreement sit near 1 (delta)
        how = _DELTA if key in ("cosine", "top1") else _RATIO
        rows.append(_row(f"verify {key}", fa.get(key), fb.get(key), how))
    rows += [
        _row("KV cache bytes/token", get(a, "kv_cache", "bytes_per_token"), get(b, "kv_cache", "bytes_per_token"),
             _RATIO, "bytes"),
        _row("warnings", len(a.get("warnings") or []), len(b.get("warnings") or []), _DELTA),
        _row("compile seconds", a.get("seconds"), b.get("seconds"), _RATIO, "s"),
    ]
    ops_a = get(a, "artifact", "ops")
    ops_b = get(b, "artifact", "ops")
    if ops_a is None or ops_b is None:  # a manifest from before op histograms were recorded
        return {"rows": rows, "ops": None}
    ops = [{"op": op, "a": ops_a.get(op, 0), "b": ops_b.get(op, 0), "delta": ops_b.get(op, 0) - ops_a.get(op, 0)}
           for op in set(ops_a) | set(ops_b) if ops_a.get(op, 0) != ops_b.get(op, 0)]
    ops.sort(key=lambda r: (-abs(r["delta"]), r["op"]))
    return {"rows": rows, "ops": ops}


def _verdict(m: dict) -> str | None:
    v = m.get("verification")
    if v is None:
        return "skipped" if "verification" in m else None
    return "pass" if v.get("passed") else "fail"


def _fmt_value(v: Any, unit: str) -> str:
    if v is None or isinstance(v, bool):
        return fmt_num(v)
    if unit == "hash":
        return fmt_hash(v)
    if unit == "bytes" and is_number(v):
        return human_bytes(v)
    if unit == "%" and is_number(v):
        return fmt_pct(v)
    if is_number(v):
        return fmt_num(v) + ("x" if unit == "x" and isinstance(v, float) else "")
    return str(v)


def _fmt_change(row: dict) -> str:
    if row["ratio"] is not None:
        return fmt_ratio(row["ratio"])
    if row["delta"] is not None:
        return fmt_pp(row["delta"]) if row["unit"] == "%" else fmt_signed(row["delta"], zero="0")
    if row["same"] is not None:
        return "same" if row["same"] else "differs"
    return "-"


def _shorten(text: str, limit: int) -> str:
    """Keep the end of long values (paths, pipelines): that is where they differ."""
    return ellipsize(text, limit, keep_end=True)


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def format_compare(a_name: str, a: dict, b_name: str, b: dict, width: int = 60) -> str:
    """Manifests ``a`` and ``b`` side by side as an aligned text table, then the ops whose counts differ."""
    result = compare_reports(a, b)
    name_a, name_b = f"A: {_shorten(str(a_name), 40)}", f"B: {_shorten(str(b_name), 40)}"
    body = []
    for row in result["rows"]:
        if row["a"] is None and row["b"] is None:
            continue  # measured on neither side (e.g. speed without --speed): nothing to compare
        body.append([row["label"], _shorten(_fmt_value(row["a"], row["unit"]), width),
                     _shorten(_fmt_value(row["b"], row["unit"]), width), _fmt_change(row)])
    lines = _table(["", name_a, name_b, "B vs A"], body, {3})
    if result["ops"] is None:
        lines.append("")
        lines.append("op histograms: not recorded in one of the manifests (compiled by an older llmopt)")
    elif result["ops"]:
        lines.append("")
        lines += _table(["op (counts differ)", "A", "B", "delta"],
                        [[r["op"], str(r["a"]), str(r["b"]), fmt_signed(r["delta"])] for r in result["ops"]], {1, 2, 3})
    else:
        lines.append("")
        lines.append("op histograms: identical")
    return "\n".join(lines)


def compare_artifacts(path_a: str | os.PathLike, path_b: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Open two artifact directories; returns (the text table, the comparison dict)."""
    from llmopt.compiler.driver import Artifact

    a, b = (Artifact.open(p).report for p in (path_a, path_b))
    _check(a, str(path_a))
    _check(b, str(path_b))
    return format_compare(str(path_a), a, str(path_b), b), compare_reports(a, b)

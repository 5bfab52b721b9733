"""llmopt.reporting.format: the one place numbers are written for people (reports, compare, bench,
eval, inspect); each helper pinned to the exact text it writes."""

from __future__ import annotations

import math

import pytest

from llmopt.reporting.format import (
    ascii_bars,
    ellipsize,
    fmt_bytes_delta,
    fmt_fixed,
    fmt_hash,
    fmt_mib,
    fmt_num,
    fmt_pct,
    fmt_pp,
    fmt_ratio,
    fmt_signed,
    human_bytes,
    human_count,
    round_significant,
    sparkline,
)


def test_bytes():
    assert human_bytes(None) == "-"
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(3 * 2**20) == "3.0 MiB"
    assert human_bytes(5 * 2**40) == "5.0 TiB" and human_bytes(2**52) == "4096.0 TiB"
    assert fmt_mib(None) == "-" and fmt_mib(3 * 2**20 + 2**19) == "3.5 MiB" and fmt_mib(3 * 2**20 + 2**19, 0) == "4 MiB"
    assert fmt_bytes_delta(None) == "-" and fmt_bytes_delta(0) == "0"
    assert fmt_bytes_delta(-109) == "-109 B" and fmt_bytes_delta(2048) == "+2.0 KiB"


def test_counts():
    assert human_count(999) == "999" and human_count(1500) == "1.50K"
    assert human_count(2_345_678) == "2.35M" and human_count(7_000_000_000) == "7.00B"


def test_numbers():
    assert fmt_num(None) == "-" and fmt_num(True) == "true" and fmt_num(12345678) == "12345678"
    assert fmt_num(0.123456789) == "0.1235" and fmt_num(0.123456789, 6) == "0.123457"
    assert fmt_num(float("inf")) == "inf" and fmt_num(float("nan")) == "nan"
    assert fmt_fixed(None) == "-" and fmt_fixed(1.5) == "1.50" and fmt_fixed(1.5, 3, " s") == "1.500 s"
    assert fmt_fixed(2.0, 2, "x") == "2.00x" and fmt_fixed(1234.5, 0) == "1234"
    assert round_significant(0.0212345) == 0.02123 and round_significant(123456.0, 3) == 123000.0


def test_changes():
    assert fmt_signed(None) == "-" and fmt_signed(3) == "+3" and fmt_signed(-167) == "-167"
    assert fmt_signed(0) == "+0" and fmt_signed(0, zero="0") == "0" and fmt_signed(0.0, zero="0") == "0"
    assert fmt_signed(0.012345) == "+0.0123" and fmt_signed(-2.5e-7) == "-2.5e-07"
    assert fmt_ratio(None) == "-" and fmt_ratio(0.27134) == "0.271x" and fmt_ratio(12.345) == "12.3x"
    assert fmt_pct(None) == "-" and fmt_pct(0.0123) == "+1.23%" and fmt_pct(-0.5, signed=False) == "-50.00%"
    assert fmt_pct(0.25, False, 1) == "25.0%" and fmt_pct(0.96, False, 0) == "96%" and fmt_pct(-0.8, decimals=0) == "-80%"
    assert fmt_pp(None) == "-" and fmt_pp(0.0123) == "+1.23 pp" and fmt_pp(-0.05) == "-5.00 pp"


@pytest.mark.parametrize("v", [0.0, 1e-9, 0.0123, -0.5, 1.0, 12.3456, 1e6])
def test_formats_are_the_python_specs_they_replace(v):
    """The helpers write what the inline format specs they replaced wrote, so no printed text moved."""
    assert fmt_pct(v) == f"{v:+.2%}" and fmt_pct(v, False, 0) == f"{v:.0%}"
    assert fmt_ratio(v) == f"{v:.3g}x" and fmt_fixed(v, 3) == f"{v:.3f}"
    assert fmt_num(v) == f"{v:.4g}" and fmt_num(v, 3) == f"{v:.3g}"
    assert fmt_pp(v) == f"{v * 100:+.2f} pp" and fmt_mib(v * 2**20) == f"{v:.1f} MiB"


def test_text():
    assert fmt_hash(None) == "-" and fmt_hash("0123456789abcdef") == "0123456789ab"
    assert ellipsize("short", 10) == "short" and ellipsize("abcdefghij", 10) == "abcdefghij"
    assert ellipsize("model.layers.0.weight", 10) == "model.lay…"
    assert ellipsize("cleanup,fuse,quantize", 10, keep_end=True) == "…,quantize"
    assert all(len(ellipsize("x" * n, 7, keep_end=k)) == min(n, 7) for n in range(20) for k in (False, True))


def test_text_charts():
    assert sparkline([]) == "" and sparkline([float("nan")]) == ""
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█" and sparkline([2, 2]) == "▁▁"
    bars = ascii_bars(["a", "long"], [1.0, 2.0], ["1 s", "2 s"], width=4).splitlines()
    assert bars == ["a     ██    1 s", "long  ████  2 s"]
    assert ascii_bars(["x"], [math.inf], ["?"], width=2) == "x      ?"  # not finite: no bar


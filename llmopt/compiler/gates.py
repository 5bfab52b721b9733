"""Gates: budgets a CI job sets on a compile (``--max-ppl-increase 1%``, ``--min-speedup 2``).

A gate is checked on the figures the compile measured itself (perplexity source vs compiled on
the eval text; the median single-token speedup of alternating pairs). A missed gate fails the
compile like a missed verification threshold: exit code 1, nothing written, the report (with
its ``gates`` list saying which was missed and by how much) still written to ``--report``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from llmopt.errors import InputError, VerificationError


class GateError(VerificationError):
    """A compile met its verification thresholds but missed a gate (exit code 1)."""


@dataclasses.dataclass(frozen=True)
class Gates:
    max_ppl_increase: float | None = None  # a fraction: 0.01 allows compiled perplexity 1% above the source's
    min_speedup: float | None = None  # compiled vs source, single-token latency (median of pairs)

    def __post_init__(self):
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise InputError(f"--max-ppl-increase must be >= 0, got {self.max_ppl_increase}")
        if self.min_speedup is not None and not (math.isfinite(self.min_speedup) and self.min_speedup > 0):
            raise InputError(f"--min-speedup must be > 0, got {self.min_speedup}")

    def __bool__(self) -> bool:
        return self.max_ppl_increase is not None or self.min_speedup is not None

    def require(self, *, has_eval_text: bool, measure_speed: bool) -> None:
        """Fail before any work when a gate cannot be measured."""
        if self.max_ppl_increase is not None and not has_eval_text:
            raise InputError("--max-ppl-increase needs a text to measure perplexity on: give --eval-text FILE "
                             "(only Hugging Face model directories with eval.txt and tokenizer.json have a default)")
        if self.min_speedup is not None and not measure_speed:
            raise InputError("--min-speedup needs the speed measurement; drop --no-speed")

    def evaluate(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        if self.max_ppl_increase is not None:
            value = (report.get("accuracy") or {}).get("perplexity_change")
            out.append(_gate("max_ppl_increase", self.max_ppl_increase, value, value is not None and value <= self.max_ppl_increase,
                             f"perplexity change {_pct(value)}, allowed {_pct(self.max_ppl_increase)}"))
        if self.min_speedup is not None:
            value = (report.get("speed") or {}).get("speedup")
            out.append(_gate("min_speedup", self.min_speedup, value, value is not None and value >= self.min_speedup,
                             f"single-token speedup {value}x, required {self.min_speedup}x"))
        return out


def _gate(name: str, limit: float, value: float | None, passed: bool, text: str) -> dict[str, Any]:
    return {"gate": name, "limit": limit, "value": value, "passed": bool(passed), "text": text}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.2f}%"


def parse_fraction(text: str, flag: str = "--max-ppl-increase") -> float:
    """``"1%"`` → 0.01; ``"0.01"`` → 0.01 (a bare number is a fraction)."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise InputError(f"{flag} '{text}' is not a percentage or a fraction (e.g. 1% or 0.01)") from None
    if not math.isfinite(value):
        raise InputError(f"{flag} '{text}' is not a finite number (e.g. 1% or 0.01)")
    if not s.endswith("%") and value >= 1:
        raise InputError(f"{flag} {text}: a bare number is a fraction ({text} = {value:.0%}); did you mean {text}%?")
    return value

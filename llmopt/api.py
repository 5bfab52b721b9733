"""The Python API for programs (CI pipelines): typed results, nothing printed.

``llmopt.compile`` (``llmopt.compiler.driver.compile``, the entry point ``llmopt compile`` calls
too) takes a ``CompileOptions`` or its fields as keywords and returns an ``Artifact``, whose
``manifest`` is the artifact's llmopt.json; ``llmopt.evaluate`` returns an ``EvalResult``;
``llmopt.benchmark`` a ``BenchResult``. Each result's ``to_dict()`` is exactly what the CLI's
``--json`` prints, and carries a ``schema`` key naming its versioned JSON Schema in
``llmopt/schemas/`` (``schema(name)``; documented in docs/ci.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from llmopt.core import model_io
from llmopt.errors import InputError

EVAL_SCHEMA = "llmopt/eval-report/v1"
SCHEMA_DIR = Path(__file__).parent / "schemas"


def schema(report: str, version: int = 1) -> dict[str, Any]:
    """The JSON Schema of a report: ``"compile-report"``, ``"eval-report"`` or ``"bench-report"``."""
    path = SCHEMA_DIR / f"{report}.v{version}.json"
    if not path.is_file():
        known = sorted(p.name for p in SCHEMA_DIR.glob("*.json"))
        raise InputError(f"no schema '{report}' v{version}; known: {', '.join(known)}")
    return json.loads(path.read_text())


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Perplexity of a model on a text, and optionally of a baseline on the same tokens."""

    model: str
    text: str
    tokens: int
    window: int
    perplexity: float
    baseline: str | None = None
    baseline_perplexity: float | None = None
    gates: tuple[dict[str, Any], ...] = ()

    @property
    def perplexity_change(self) -> float | None:
        """Relative change vs the baseline (0.01 = 1% higher), or None without one."""
        if self.baseline_perplexity is None:
            return None
        return self.perplexity / self.baseline_perplexity - 1

    @property
    def passed(self) -> bool:
        return all(g["passed"] for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        change = self.perplexity_change
        return {
            "schema": EVAL_SCHEMA,
            "model": self.model,
            "text": self.text,
            "tokens": self.tokens,
            "window": self.window,
            "perplexity": round(self.perplexity, 4),
            "baseline": self.baseline,
            "baseline_perplexity": None if self.baseline_perplexity is None else round(self.baseline_perplexity, 4),
            "perplexity_change": None if change is None else round(change, 5),
            "gates": list(self.gates),
        }


def evaluate(
    model: str | os.PathLike,
    text: str | os.PathLike,
    *,
    baseline: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    tokens: int = 8192,
    window: int = 128,
    threads: int = 2,
    max_ppl_increase: float | None = None,
) -> EvalResult:
    """Perplexity of ``model`` (an artifact directory or .onnx file) on the text file ``text``.

    The tokenizer is the model's own (an artifact holds tokenizer.json) unless ``tokenizer``
    names a directory with one. With ``baseline`` (e.g. the source model), both run on the same
    tokens; ``max_ppl_increase`` (a fraction) then gates the change: see ``EvalResult.passed``.
    """
    from llmopt.ort import perplexity as pplx
    from llmopt.ort import sessions
    from llmopt.compiler.gates import Gates

    gates = Gates(max_ppl_increase=max_ppl_increase)
    if gates and baseline is None:
        raise InputError("--max-ppl-increase needs --baseline MODEL to compare against")
    model_file = model_io.resolve_model_file(model)
    tok_dir = Path(tokenizer) if tokenizer is not None else _tokenizer_dir(model_file, baseline)
    ids = pplx.tokenize_file(pplx.load_tokenizer(tok_dir), text, tokens)
    ppl = pplx.perplexity(sessions.make_session(model_file, _providers(model_file), threads=threads), ids, window=window)
    base_ppl = None
    if baseline is not None:
        base_file = model_io.resolve_model_file(baseline)
        base_ppl = pplx.perplexity(sessions.make_session(base_file, _providers(base_file), threads=threads), ids,
                                   window=window)["perplexity"]
    result = EvalResult(str(model), str(text), ppl["tokens"], window, ppl["perplexity"],
                        None if baseline is None else str(baseline), base_ppl)
    if gates:
        checked = gates.evaluate({"accuracy": {"perplexity_change": result.perplexity_change}})
        result = dataclasses.replace(result, gates=tuple(checked))
    return result


def _tokenizer_dir(model_file: Path, baseline) -> Path:
    for d in [model_file.parent] + ([model_io.resolve_model_file(baseline).parent] if baseline is not None else []):
        if (d / "tokenizer.json").is_file():
            return d
    raise InputError(f"{model_file.parent}: no tokenizer.json next to the model; give --tokenizer DIR")


def _providers(model_file: Path) -> tuple[str, ...]:
    """The providers an artifact is verified on (a CUDA artifact's graph also runs on CPU)."""
    from llmopt.compiler.driver import MANIFEST, Artifact

    if (model_file.parent / MANIFEST).is_file():
        manifest = Artifact.open(model_file.parent).manifest
        return tuple(manifest["target"].get("verify_providers") or ("CPUExecutionProvider",))
    return ("CPUExecutionProvider",)


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """What ``llmopt bench`` measures; ``report`` is the full dict (``--json``)."""

    report: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.report

    def decode_tokens_per_s(self, batch: int = 1, model: str = "artifact") -> float:
        return self.report["models"][model]["batches"][str(batch)]["decode_tokens_per_s"]

    def prefill_tokens_per_s(self, batch: int = 1, model: str = "artifact") -> float:
        return self.report["models"][model]["batches"][str(batch)]["prefill_tokens_per_s"]

    def decode_speedup(self, batch: int = 1) -> float:
        """Artifact vs baseline, median of per-run ratios (needs a baseline)."""
        ratios = self.report.get("ratios")
        if not ratios:
            raise ValueError("no baseline was measured; pass baseline= to llmopt.benchmark")
        return ratios[str(batch)]["decode_speedup"]

    def kv_cache_bytes(self, batch: int = 1, model: str = "artifact") -> int:
        return self.report["models"][model]["batches"][str(batch)]["kv_cache_bytes"]


def benchmark(
    artifact: str | os.PathLike,
    baseline: str | os.PathLike | None = None,
    *,
    prompt_len: int = 128,
    new_tokens: int = 100,
    batches: Sequence[int] = (1,),
    repeats: int = 3,
    threads: int = 2,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Load time, prefill/decode tokens/s, step latency, KV-cache bytes, roofline — as ``llmopt bench``."""
    from llmopt.ort.bench import BenchSettings
    from llmopt.ort.bench import benchmark as run

    settings = BenchSettings(prompt_len=prompt_len, new_tokens=new_tokens, batches=tuple(batches),
                             repeats=repeats, threads=threads)
    report = run(Path(artifact), None if baseline is None else Path(baseline), settings, progress=progress)
    return BenchResult(json.loads(json.dumps(report)))  # JSON types, exactly what `llmopt bench --json` prints

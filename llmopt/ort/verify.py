"""Numerical verification: run two models in ONNX Runtime on the same
deterministic sample inputs and compare what they output."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx_ir as ir

from llmopt.core import model_io, graph_util
from llmopt.errors import InputError, VerificationError, first_line
from llmopt.ort.sessions import make_session, run

# ONNX tensor dtype → numpy dtype for the inputs we synthesize.
_NP = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.BOOL: np.bool_,
}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """What a compiled model must meet against its source, on every sample."""

    max_abs: float | None = None  # largest |a - b| over logits
    min_cosine: float | None = None  # cosine similarity of the flattened logits
    min_top1: float | None = None  # fraction of positions whose argmax agrees

    def as_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Figures:
    max_abs: float
    mean_abs: float
    cosine: float
    top1: float
    other_max_abs: float  # over non-logits outputs (e.g. present KV), 0 if none

    def as_dict(self) -> dict[str, float]:
        return {k: _round(v) for k, v in dataclasses.asdict(self).items()}

    def misses(self, t: Thresholds) -> list[str]:
        """Human-readable list of thresholds missed, with the margin."""
        out = []
        if t.max_abs is not None and not self.max_abs <= t.max_abs:
            out.append(f"max-abs error {self.max_abs:.3g} > {t.max_abs:.3g} (over by {self.max_abs - t.max_abs:.3g})")
        if t.min_cosine is not None and not self.cosine >= t.min_cosine:
            out.append(f"logits cosine {self.cosine:.6f} < {t.min_cosine} (short by {t.min_cosine - self.cosine:.3g})")
        if t.min_top1 is not None and not self.top1 >= t.min_top1:
            out.append(f"top-1 agreement {self.top1:.3f} < {t.min_top1} (short by {t.min_top1 - self.top1:.3f})")
        return out


def _round(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else float(v)


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class SampleShape:
    batch: int
    seq: int
    past: int


def default_shapes(has_past: bool) -> list[SampleShape]:
    """A prefill and a decode step, as generation runs them (batch 2 each).

    Prefill starts from an empty cache: ORT's fused GroupQueryAttention, like generation loops,
    takes several new tokens per step only without past context (or at batch 1).
    """
    if has_past:
        return [SampleShape(2, 8, 0), SampleShape(2, 1, 12)]
    return [SampleShape(2, 12, 0), SampleShape(1, 5, 0)]


def has_past_inputs(model: ir.Model) -> bool:
    return any(_is_past(v.name) for v in model.graph.inputs)


def _is_past(name: str) -> bool:
    return name.startswith("past_key_values") or name.startswith("past.") or ".past_" in name


def vocab_size(model: ir.Model) -> int:
    """Vocabulary size: the logits' last dim, else the embedding table feeding on input_ids."""
    for out in model.graph.outputs:
        if out.name == "logits" and out.shape is not None and isinstance(out.shape[-1], int):
            return int(out.shape[-1])
    ids = next((v for v in model.graph.inputs if v.name == "input_ids"), None)
    if ids is not None:
        for use in ids.uses():
            node = use.node
            if node.op_type in ("Gather", "GatherBlockQuantized") and use.idx == 1:
                table = node.inputs[0]
                if table is not None and table.shape is not None and isinstance(table.shape[0], int):
                    return int(table.shape[0])
    return 64


def sample_inputs(model: ir.Model, shape: SampleShape, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for a decoder-style model (and sensible randoms for anything else)."""
    rng = np.random.default_rng(seed)
    b, s, p = shape.batch, shape.seq, shape.past
    vocab = vocab_size(model)
    feeds: dict[str, np.ndarray] = {}
    for v in model.graph.inputs:
        if v.const_value is not None:  # an input with a default (e.g. logits_to_keep): left to it
            continue
        dtype = _NP.get(v.dtype, np.float32)
        dims = list(v.shape) if v.shape is not None else []
        if v.name == "input_ids":
            feeds[v.name] = rng.integers(0, vocab, size=(b, s)).astype(dtype)
        elif v.name == "attention_mask":
            feeds[v.name] = np.ones((b, p + s), dtype=dtype)
        elif v.name == "position_ids":
            feeds[v.name] = np.broadcast_to(np.arange(p, p + s, dtype=dtype), (b, s)).copy()
        elif _is_past(v.name) and len(dims) == 4:
            kv_heads, head_dim = graph_util.cache_dims(v) or (_static(dims[1], 1), _static(dims[3], 1))
            shp = [b, kv_heads, p, head_dim]
            feeds[v.name] = rng.standard_normal(shp).astype(dtype)
        else:
            shp = [_static(d, b if i == 0 else s) for i, d in enumerate(dims)]
            if np.issubdtype(dtype, np.integer):
                feeds[v.name] = rng.integers(0, 2, size=shp).astype(dtype)
            else:
                feeds[v.name] = rng.standard_normal(shp).astype(dtype)
    return feeds


def _static(d: Any, default: int) -> int:
    return int(d) if isinstance(d, int) else default


# --------------------------------------------------------------------------- running


ORT_DEFAULT_DOMAIN_OPS = model_io.ORT_DEFAULT_DOMAIN_OPS  # the checker would reject the model at the first one


def check_onnx(path: str | os.PathLike) -> None:
    """The ONNX checker, by path (external data and >2 GB models are fine that way).

    ORT's default-domain extensions are checked as custom-domain ops (i.e. not by schema).
    """
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    extended = [n for n in proto.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ORT_DEFAULT_DOMAIN_OPS]
    if not extended:
        onnx.checker.check_model(str(path))
        return
    for n in extended:
        n.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    shadow = path.with_name(f".checked.{path.name}")  # beside the data file, so references resolve
    onnx.save(proto, str(shadow))
    try:
        onnx.checker.check_model(str(shadow))
    finally:
        shadow.unlink(missing_ok=True)


# --------------------------------------------------------------------------- comparing


def logits_name(names: Iterable[str]) -> str:
    names = list(names)
    return "logits" if "logits" in names else names[0]


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Figures:
    key = logits_name(reference)
    if key not in candidate:
        raise KeyError(f"compiled model has no output '{key}'")
    a = reference[key].astype(np.float64)
    b = candidate[key].astype(np.float64)
    if a.shape != b.shape:
        return Figures(math.inf, math.inf, 0.0, 0.0, math.inf)
    diff = np.abs(a - b)
    fa, fb = a.ravel(), b.ravel()
    denom = np.linalg.norm(fa) * np.linalg.norm(fb)
    cosine = float(fa @ fb / denom) if denom > 0 else (1.0 if np.array_equal(fa, fb) else 0.0)
    top1 = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    other = 0.0
    for name, ref in reference.items():
        if name == key or name not in candidate:
            continue
        if ref.shape != candidate[name].shape:
            other = math.inf
            continue
        if ref.size:
            other = max(other, float(np.abs(ref.astype(np.float64) - candidate[name].astype(np.float64)).max()))
    return Figures(float(diff.max()) if diff.size else 0.0, float(diff.mean()) if diff.size else 0.0, cosine, top1, other)


def worst(figures: list[Figures]) -> Figures:
    """Combine per-sample figures into the worst case over samples."""
    return Figures(
        max(f.max_abs for f in figures),
        max(f.mean_abs for f in figures),
        min(f.cosine for f in figures),
        min(f.top1 for f in figures),
        max(f.other_max_abs for f in figures),
    )


@dataclasses.dataclass
class Verification:
    figures: Figures
    thresholds: Thresholds
    samples: list[dict[str, int]]
    provider: str

    @property
    def passed(self) -> bool:
        return not self.figures.misses(self.thresholds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "provider": self.provider,
            "samples": self.samples,
            "figures": self.figures.as_dict(),
            "thresholds": self.thresholds.as_dict(),
            "misses": self.figures.misses(self.thresholds),
        }


def verify_files(
    source: str | os.PathLike,
    compiled: str | os.PathLike,
    thresholds: Thresholds,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    seed: int = 0,
    config: dict[str, str] | None = None,
) -> Verification:
    """Run source and compiled models in ORT on the same samples and compare their logits.

    When the source has no KV cache and the compiled model has one (the ``kv-cache`` pass added
    it), the compiled model decodes incrementally — a prefill, then one token per step — and its
    logits are compared with the source's over the whole sequence (full recomputation).
    ``config``: session config entries for the compiled model's session (a target's
    ``verify_session_config``).
    """
    src_model = model_io.load(source)
    if not has_past_inputs(src_model) and has_past_inputs(model_io.load(compiled)):
        return _verify_incremental(source, compiled, src_model, thresholds, providers, seed, config=config)
    shapes = default_shapes(has_past_inputs(src_model))
    feeds = [sample_inputs(src_model, sh, seed + i) for i, sh in enumerate(shapes)]
    del src_model
    ref_sess = make_session(model_io.resolve_model_file(source))
    try:
        refs = [run(ref_sess, f) for f in feeds]
    except Exception as exc:  # noqa: BLE001 - ORT's errors: the source itself cannot run these samples
        raise InputError(f"{source}: ONNX Runtime fails running the source on llmopt's sample inputs "
                         f"({first_line(exc, 240)}); compile with --no-verify if its inputs are not a "
                         "decoder's (input_ids, attention_mask, position_ids, past_key_values.*)") from None
    del ref_sess
    sess = _compiled_session(compiled, providers, config)
    figs = []
    for shape, ref, feed in zip(shapes, refs, feeds):
        try:
            figs.append(compare(ref, run(sess, feed)))
        except Exception as exc:  # the compiled graph fails on an input the source runs
            raise VerificationError(
                f"the compiled model fails on a sample the source runs ({dataclasses.asdict(shape)}): {first_line(exc)}"
            ) from None
    return Verification(worst(figs), thresholds, [dataclasses.asdict(s) for s in shapes], providers[0])


def _compiled_session(compiled, providers, config=None):
    try:
        return make_session(model_io.resolve_model_file(compiled), providers, config=config)
    except Exception as exc:  # ORT refuses the graph: a pass produced something it cannot run
        raise VerificationError(
            f"ONNX Runtime ({providers[0]}) cannot load the compiled model: {first_line(exc)}; "
            "rerun with --verify-each to name the pass that broke it"
        ) from None


def _verify_incremental(source, compiled, src_model, thresholds: Thresholds, providers, seed: int,
                        batch: int = 2, prefill: int = 8, steps: int = 4, config=None) -> Verification:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size(src_model), size=(batch, prefill + steps)).astype(np.int64)
    del src_model
    ref_sess = make_session(model_io.resolve_model_file(source))
    full = run(ref_sess, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                          "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()})
    key = logits_name(full)
    del ref_sess
    sess = _compiled_session(compiled, providers, config)
    pasts = [i for i in sess.get_inputs() if _is_past(i.name)]
    feeds = {p.name: np.zeros((batch, p.shape[1], 0, p.shape[3]), np.float32) for p in pasts}  # cast by run()
    figs, start = [], 0
    for length in [prefill] + [1] * steps:
        end = start + length
        feeds.update(input_ids=ids[:, start:end], attention_mask=np.ones((batch, end), np.int64),
                     position_ids=np.broadcast_to(np.arange(start, end), (batch, length)).copy())
        try:
            out = run(sess, feeds)
        except Exception as exc:
            raise VerificationError(f"the compiled model fails on an incremental decoding step "
                                    f"(tokens {start}..{end - 1}): {first_line(exc)}") from None
        figs.append(compare({key: full[key][:, start:end]}, {key: out[key]}))
        feeds.update({name.replace("present", "past_key_values"): v for name, v in out.items() if name.startswith("present")})
        start = end
    samples = [{"batch": batch, "prefill": prefill, "decode_steps": steps, "reference": "full recomputation"}]
    return Verification(worst(figs), thresholds, samples, providers[0])


"""`fuse`: operator fusion for transformer graphs, as an ordered list of named rule stages.

Which rules are whose:

=====================  ======================================================  ==========
stage (counter)        what it does                                            rules
=====================  ======================================================  ==========
gemm_to_matmul         ``Gemm`` → ``MatMul`` + ``Add``                         llmopt
rotary_angles          transformers ≥ 5 rotary angles → the MatMul form        llmopt
identity_reshape       drop a Reshape to the shape its input has (Phi-3)       llmopt
flattened_linear       Reshape→MatMul→Reshape around linears (GPT-2) → MatMul  llmopt
reshape_dims_from_...  run-time assembled Reshape shapes → constants (static   llmopt
                       head counts; TorchScript / Optimum exports)
static_dims,           TorchScript's shape, expand and mask idioms → the form  llmopt
expand_shape,          the rules match (fuse_canonical.py)
scalar_where,
reciprocal_div
(prepare)              shape inference, constant folding, shape rules          onnxscript
(reinfer_shapes)       shapes again; canonical_round_two: the canonical forms  llmopt
                       again with them, then identity_reshape again
canonical_dims         ``seq + past`` and ``past + seq`` spelled alike         llmopt
rms_normalization      RMSNorm → ``SimplifiedLayerNormalization``              onnxscript
skip_*_normalization   residual Add + norm → ``Skip(Simplified)LayerNorm``     onnxscript
rotary_embedding       rotate-half → ``RotaryEmbedding``                       onnxscript
cos_sin_cache          cos/sin of the angles → shared cache initializers       onnxscript
partial_rotary_...     rotary over part of the head (Phi)                      onnxscript
rotary_positions_...   ``[1, S]`` position ids → ``[batch, S]`` (no-cache exports)  llmopt
sdpa                   MatMul/Softmax/mask chain → SDPA (internal)             onnxscript
sdpa_softcap           the same with ``cap·tanh(s/cap)`` on the scores (Gemma  llmopt
                       2) → SDPA with ``softcap``
gqa                    SDPA with grouped K/V + rotary → ``GroupQueryAttention``  onnxscript,
                       (with the graph's attention scale, soft cap, and the    llmopt
                       mask's sliding window as ``local_window_size``,
                       fuse_mask.py)
gqa_seqlens_from_mask  GQA's lengths from ``attention_mask`` (else per row     llmopt
                       from ``input_ids``' shape)
pack_qkv               three Q/K/V MatMuls → one packed MatMul                 llmopt
packed_qkv_for_gqa     Slices of a packed QKV (Phi-3) → packed GQA input       onnxscript
sliced_qkv             the same without a KV cache (onnxscript's needs one)    llmopt
mha*, sdpa_via_mha     SDPA → ``MultiHeadAttention`` (+ bias, scale, past)     onnxscript
flattened_linear_...   the same Reshapes after a ``MultiHeadAttention``        llmopt
gelu, bias_gelu        tanh/erf GELU → ``FastGelu`` / ``Gelu`` / ``BiasGelu``  onnxscript
gelu_half_first        ``(0.5·x)·(1+tanh(…))`` (torch's export) → ``FastGelu``  llmopt
fast_gelu_bias         ``FastGelu(x + b)`` → ``FastGelu(x, b)``                llmopt
silu                   ``x·Sigmoid(x)`` → ``QuickGelu(alpha=1)``               llmopt
=====================  ======================================================  ==========

The onnxscript rule sets are the ones its ``optimize_for_ort`` runs, reused as they are, in its
order; llmopt runs them itself so that options can select groups (``fuse{attention=mha}``), every
stage counts, and ``--explain fuse`` can say, for a rule that fired zero times, the best partial
match and the check that failed (onnxscript's ``MatchingTracer``).

Known limit of the fused attention (ORT's ``GroupQueryAttention``): sequence lengths come from
the sum of ``attention_mask`` (right padding), and a step with several new tokens *and* past
context must have batch 1 — which is how generation loops run prefill and decode.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import (
    ORT_PATTERN_REWRITE_RULES,
    bias_gelu,
    cos_sin_cache,
    erfgelu,
    gelu,
    gqa_packed_qkv,
    mha,
    mha_bias,
    mha_scale,
    rms_normalization,
    rotary_embedding,
    sdpa,
    sdpa_via_mha,
    shape_optimization,
    skip_normalization,
)

from llmopt.errors import first_line
from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass
from llmopt.core.rules import explain_rules
from llmopt.passes import fuse_canonical as canon
from llmopt.passes import fuse_rules as ours
from llmopt.passes.fuse_guard import NumericGuard

ATTENTION_MODES = ("auto", "gqa", "mha", "none")
FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate ops (SDPA, ...), not runnable


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    norm: bool = option(True, "RMSNorm / LayerNorm and their residual (skip) forms")
    rotary: bool = option(True, "rotary embeddings and their cos/sin caches")
    attention: str = option("auto", "auto (GroupQueryAttention where it matches, else MultiHeadAttention) | gqa | mha | none")
    pack_qkv: bool = option(True, "pack the Q/K/V projections feeding GroupQueryAttention into one MatMul")
    gelu: bool = option(True, "GELU forms → Gelu / FastGelu / BiasGelu")
    silu: bool = option(False, "x·Sigmoid(x) → QuickGelu(alpha=1) (off: no measurable gain on CPU, docs/benchmarks.md)")
    clear_metadata: bool = option(False, "drop node metadata and doc strings (exporter stack traces)")
    guard: bool = option(True, "keep a group of rewrites only if the graph still computes what it did "
                               "(ONNX Runtime, batch 2, with and without past); roll it back otherwise")

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            from llmopt.errors import PipelineError

            raise PipelineError(f"fuse: attention={self.attention!r} is not one of {', '.join(ATTENTION_MODES)}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One named step: a rule set (counted, explainable) or a function returning a count."""

    name: str
    rules: pattern.RewriteRuleSet | None = None
    func: Callable[[ir.Model], int] | None = None
    enabled: Callable[[FuseOptions], bool] = lambda o: True
    shape_inference: bool = False  # re-infer shapes after it fired (rules that add nodes)
    group: str = ""  # consecutive stages of a group are one unit: checked and rolled back together


def _rules(*rules) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(list(rules))


def _prepare(model: ir.Model) -> int:
    """onnxscript's pre-fusion optimization: shape inference, folding, shape rules."""
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)
    return 0


def _round_two(model: ir.Model) -> int:
    """The canonical forms again once shapes are better known, then folding and shapes again."""
    n = canon.expand_shape(model) + canon.reshape_dims_from_shape(model) + canon.static_dims(model)
    if n:
        _prepare(model)
        canon.reinfer_shapes(model)
    return n


def _reshapes_again(model: ir.Model) -> int:
    """With the rotary outputs' shapes known, reshapes between attention and its output projection
    may now be proven identities (TorchScript's ``attn_output.reshape``): constant, then dropped."""
    n = canon.reshape_dims_from_shape(model)
    if n:
        common_passes.ShapeInferencePass()(model)
        n += pattern.RewriteRuleSet([ours.IdentityReshape.rule()]).apply_to_model(model)
        common_passes.IdentityEliminationPass()(model)
    return n


def _cse(model: ir.Model) -> int:
    common_passes.CommonSubexpressionEliminationPass()(model)
    return 0


_attn = lambda *modes: (lambda o: o.attention in modes)  # noqa: E731

STAGES: tuple[Stage, ...] = (
    Stage("gemm_to_matmul", func=ours.gemm_to_matmul),
    Stage("rotary_angles", _rules(ours.RotaryAngles.rule()), enabled=lambda o: o.rotary),
    Stage("identity_reshape", _rules(ours.IdentityReshape.rule())),
    Stage("flattened_linear", _rules(*(ours.FlattenedLinear.rule(b, "reshape") for b in (True, False)))),
    Stage("expand_shape", func=canon.expand_shape),
    Stage("reshape_dims_from_shape", func=canon.reshape_dims_from_shape),
    Stage("static_dims", func=canon.static_dims),
    Stage("scalar_where", func=canon.scalar_where),
    Stage("reciprocal_div", _rules(canon.ReciprocalDiv.rule())),
    Stage("prepare", func=_prepare),
    Stage("reinfer_shapes", func=canon.reinfer_shapes),
    # again, with the shapes the first round made known (TorchScript's chains resolve in two steps)
    Stage("canonical_round_two", func=lambda m: _round_two(m)),
    Stage("identity_reshape", _rules(ours.IdentityReshape.rule())),
    Stage("drop_identity", func=lambda m: int(common_passes.IdentityEliminationPass()(m).modified)),
    Stage("canonical_dims", func=ours.canonical_dims),
    Stage("erf_gelu", erfgelu.rules, enabled=lambda o: o.gelu),
    Stage("rms_normalization", rms_normalization.rms_normalization_ruleset, enabled=lambda o: o.norm),
    Stage("skip_layer_normalization", skip_normalization.skip_layer_normalization_ruleset, enabled=lambda o: o.norm),
    Stage("skip_rms_normalization", skip_normalization.skip_rms_normalization_ruleset, enabled=lambda o: o.norm),
    Stage("rotary_embedding", rotary_embedding.rotary_embedding_rules, enabled=lambda o: o.rotary),
    Stage("cos_sin_cache", cos_sin_cache.cos_sin_cache_rules, enabled=lambda o: o.rotary, group="rotary"),
    Stage("cse", func=_cse, group="rotary"),
    Stage("partial_rotary_embedding", rotary_embedding.partial_embedding_rules, enabled=lambda o: o.rotary, group="rotary"),
    Stage("rotary_positions_per_row", func=ours.rotary_positions_per_row, enabled=lambda o: o.rotary, group="rotary"),
    Stage("rotary_shapes", func=canon.rotary_shapes, enabled=lambda o: o.rotary, group="rotary"),
    Stage("reshapes_after_rotary", func=lambda m: _reshapes_again(m), enabled=lambda o: o.rotary, group="rotary"),
    Stage("sdpa", sdpa.sdpa_rules, enabled=_attn("auto", "gqa", "mha"), shape_inference=True, group="attention"),
    Stage("sdpa_softcap", _rules(ours.SoftcapSDPA.rule()), enabled=_attn("auto", "gqa", "mha"), shape_inference=True,
          group="attention"),
    Stage("canonical_dims_after_sdpa", func=ours.canonical_dims, enabled=_attn("auto", "gqa", "mha"), group="attention"),
    Stage("gqa", _rules(ours.ScaledGQA.rule()), enabled=_attn("auto", "gqa"), group="attention"),
    Stage("gqa_seqlens_from_mask", func=ours.gqa_seqlens_from_mask, enabled=_attn("auto", "gqa"), group="attention"),
    Stage("pack_qkv", _rules(*(ours.PackQKV.rule(b, p) for b in (False, True) for p in (True, False))),
          enabled=lambda o: o.pack_qkv and o.attention in ("auto", "gqa"), group="attention"),
    Stage("packed_qkv_for_gqa", gqa_packed_qkv.fuse_qkv_gqa_rules, enabled=_attn("auto", "gqa"), group="attention"),
    Stage("sliced_qkv", _rules(ours.SlicedQKV.rule(True), ours.SlicedQKV.rule(False)), enabled=_attn("auto", "gqa"), group="attention"),
    Stage("mha1", mha.mha_rules_with_past, enabled=_attn("auto", "mha"), group="attention"),
    Stage("mha2", mha.mha_rules_no_past, enabled=_attn("auto", "mha"), group="attention"),
    Stage("mha_scale", mha_scale._mha_scale_rules, enabled=_attn("auto", "mha"), group="attention"),
    Stage("mha_bias", mha_bias.mha_bias_rules, enabled=_attn("auto", "mha"), group="attention"),
    Stage("sdpa_via_mha", sdpa_via_mha._rules, enabled=_attn("auto", "mha"), group="attention"),
    Stage("flattened_linear_after_mha", _rules(*(ours.FlattenedLinear.rule(b, "mha") for b in (True, False))),
          enabled=_attn("auto", "mha"), group="attention"),
    Stage("gelu", gelu.gelu_rules, enabled=lambda o: o.gelu),
    Stage("gelu_half_first", _rules(ours.GeluTanhHalfFirst.rule()), enabled=lambda o: o.gelu),
    Stage("fast_gelu_bias", _rules(ours.FastGeluBias.rule()), enabled=lambda o: o.gelu),
    Stage("bias_gelu", bias_gelu.bias_gelu_rules, enabled=lambda o: o.gelu),
    Stage("silu", pattern.RewriteRuleSet([ours.SiluAsQuickGelu.rule()], commute=True), enabled=lambda o: o.silu),
)

# Stages that are plumbing, not fusions: never counted or explained.
_PLUMBING = {"prepare", "reinfer_shapes", "reshapes_after_rotary", "drop_identity", "rotary_shapes", "cse", "canonical_dims", "canonical_dims_after_sdpa"}


def _structure(model: ir.Model) -> tuple:
    """The graph's node structure: ops, attributes and wiring (value identity and name)."""

    def key(v):
        return None if v is None else (id(v), v.name)

    def attr(a):  # scalars and lists by value; tensors and graphs by identity (never printed)
        return str(a.value) if isinstance(a.value, (int, float, str, list, tuple)) else id(a.value)

    return tuple(
        (n.domain, n.op_type, tuple(sorted((k, attr(a)) for k, a in n.attributes.items())),
         tuple(map(key, n.inputs)), tuple(map(key, n.outputs)))
        for n in model.graph
    )


@dataclasses.dataclass
class _State:
    """What a rollback restores: the graph (a clone; tensors shared), counters, explanations, warnings."""

    model: ir.Model
    counters: dict[str, int]
    explained: int
    warned: int


@register_pass
class Fuse(Pass):
    name = "fuse"
    summary = "Fuse norms, GELU, rotary embeddings and attention into ONNX Runtime contrib ops."
    Options = FuseOptions

    def run(self, model: ir.Model) -> bool:
        before = _structure(model)
        self._guard = self._make_guard(model) if self.options.guard else None
        units = _units([s for s in STAGES if s.enabled(self.options)])
        for span in _spans(units):
            self._run_span(model, span)
        self._run_span(model, [(_FINISH,)])
        if self.options.clear_metadata:
            common_passes.ClearMetadataAndDocStringPass()(model)
        return _structure(model) != before

    # ------------------------------------------------------------------ guarded spans

    def _make_guard(self, model: ir.Model) -> NumericGuard | None:
        try:
            return NumericGuard(model)
        except Exception as exc:  # noqa: BLE001 - e.g. a graph only another provider runs
            self.warn(f"rewrites not checked numerically: the graph it was given does not run on "
                      f"ONNX Runtime's CPU provider ({first_line(exc, 160)}); the compile's verification still applies")
            return None

    def _run_span(self, model: ir.Model, span: list[tuple[Stage, ...]]) -> None:
        """Run the units of a span, checked once at its end; if the span disagrees, replay it unit by
        unit from where it started, checking each, and roll back the units that disagree."""
        state = self._save(model)
        start = _structure(model)
        for unit in span:
            self._run_unit(model, unit)
        if self._guard is None or _structure(model) == start:
            return
        bad = self._guard.disagreement(model)
        if bad is None:
            return
        if len(span) == 1:
            self._roll_back(model, state, span[0], bad)
            self._fall_back(model, span[0])
            return
        self._restore(model, state)
        for unit in span:
            unit_state, unit_start = self._save(model), _structure(model)
            self._run_unit(model, unit)
            if _structure(model) == unit_start:
                continue
            bad = self._guard.disagreement(model)
            if bad is not None:
                self._roll_back(model, unit_state, unit, bad)
                self._fall_back(model, unit)

    def _fall_back(self, model: ir.Model, unit: tuple[Stage, ...]) -> None:
        """Attention that GroupQueryAttention could not take (e.g. ORT's CPU kernel wants a head size
        that is a multiple of 16) gets MultiHeadAttention instead, checked the same way."""
        if unit[0].group != "attention" or self.options.attention != "auto":
            return
        mha = dataclasses.replace(self.options, attention="mha")
        alternative = tuple(s for s in unit if s.enabled(mha))
        if alternative and alternative != unit:
            self.count("attention_retried_as_mha")
            self._run_span(model, [alternative])

    def _run_unit(self, model: ir.Model, unit: tuple[Stage, ...]) -> None:
        attention = unit[0].group == "attention"
        state = self._save(model) if attention else None
        for stage in unit:
            self._run_stage(model, stage)
        if attention:
            self._commit_or_roll_back(model, state)

    def _run_stage(self, model: ir.Model, stage: Stage) -> None:
        if stage.func is not None:
            n = stage.func(model)
            if n and stage.shape_inference:
                common_passes.ShapeInferencePass()(model)
        else:
            n = stage.rules.apply_to_model(model)
            if n and stage.shape_inference:
                common_passes.ShapeInferencePass()(model)
            if not n and self.explain:
                for entry in explain_rules(model, stage.rules):
                    self.explain_why(stage=stage.name, **entry)
        if n and stage.name not in _PLUMBING:
            self.count(stage.name, n)

    def _save(self, model: ir.Model) -> _State:
        model.graph.sort()  # a rewrite may leave a consumer before its new producer; cloning needs order
        return _State(model.clone(), dict(self.counters), len(self.explanations), len(self.warnings))

    def _restore(self, model: ir.Model, state: _State, drop_notes: bool = True) -> None:
        """Back to ``state``; ``drop_notes``: also forget explanations and warnings made since (a span
        about to be replayed makes them again; a rolled-back unit keeps them: they say why)."""
        snapshot = state.model.clone()  # the state may be restored again (a span replayed)
        model.graph = snapshot.graph
        model.functions.clear()
        model.functions.update(snapshot.functions)
        self.counters.clear()
        self.counters.update(state.counters)
        if drop_notes:
            del self.explanations[state.explained:]
            del self.warnings[state.warned:]

    def _roll_back(self, model: ir.Model, state: _State, unit: tuple[Stage, ...], bad) -> None:
        """Undo ``unit``: its rewrites change what the graph computes (or make it unrunnable)."""
        name = _unit_name(unit)
        fired = [s.name for s in unit if self.counters.get(s.name, 0) > state.counters.get(s.name, 0)]
        where = self._guard.locate(state.model, model)
        self._restore(model, state, drop_notes=False)
        self.count("rolled_back", 1)
        what = f"{name} ({', '.join(fired)})" if fired and fired != [name] else name
        at = f"; first disagreement at {where}" if where else ""
        self.warn(f"rolled back {what}: the rewritten graph disagrees with the graph before it "
                  f"({bad}{at}); left unfused there (--explain fuse)")
        if self.explain:
            self.explain_why(stage=name, rule=name, status="rolled back",
                             reason=f"numerical guard: {bad} on the samples {self._guard.samples}",
                             at=where or None, matched_nodes=0, near=fired)

    def _commit_or_roll_back(self, model: ir.Model, state: _State) -> None:
        """Attention fuses in two steps (subgraph → internal SDPA → a kernel). An SDPA that no kernel
        rule took (e.g. ``attention=gqa`` on a model without rotary) cannot run, so the attention
        stages are undone as a whole and the attention left as exported: fail safe."""
        stuck = [n.name for n in model.graph if n.domain == FUSION_DOMAIN]
        if not stuck:
            return
        self._restore(model, state, drop_notes=False)
        self.count("attention_left_unfused", len(stuck))
        if self.explain:
            self.explain_why(stage="attention", rule="attention", status="rolled back",
                             reason=f"{len(stuck)} attention subgraph(s) matched SDPA but no kernel rule enabled by "
                                    f"attention={self.options.attention} took them; attention left as exported",
                             at=stuck[0], matched_nodes=0, near=stuck[1:3])


def _finish(model: ir.Model) -> int:
    """Inline fusion helpers no rule consumed, drop dead nodes, ORT's own small rewrites, then lift
    constants and re-infer shapes."""
    optimize(model)
    pattern.RewriteRuleSet(ORT_PATTERN_REWRITE_RULES).apply_to_model(model)
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
        common_passes.RemoveInitializersFromInputsPass(),
        common_passes.ShapeInferencePass(),
    )(model)
    return 0


_FINISH = Stage("finish", func=_finish)
_PLUMBING.add("finish")

# Spans: stages checked together (a span that disagrees is replayed unit by unit). A span starts at
# each of these stages; the attention stages are one unit (they only run as a whole).
_SPAN_STARTS = {"gemm_to_matmul", "erf_gelu", "sdpa", "gelu"}


def _units(stages: list[Stage]) -> list[tuple[Stage, ...]]:
    units: list[tuple[Stage, ...]] = []
    for s in stages:
        if s.group and units and units[-1][0].group == s.group:
            units[-1] = units[-1] + (s,)
        else:
            units.append((s,))
    return units


def _spans(units: list[tuple[Stage, ...]]) -> list[list[tuple[Stage, ...]]]:
    spans: list[list[tuple[Stage, ...]]] = []
    for u in units:
        if not spans or u[0].name in _SPAN_STARTS or u[0].group or spans[-1][-1][0].group:
            spans.append([u])
        else:
            spans[-1].append(u)
    return spans


def _unit_name(unit: tuple[Stage, ...]) -> str:
    return unit[0].group or unit[0].name

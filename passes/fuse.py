"""`fuse`: operator fusion for transformer graphs, as an ordered list of named rule stages.

The stages, and which rules are whose: the table in ``fuse_stages.py``. This module runs them, each
group of rewrites checked numerically (``fuse_guard.py``) and rolled back where it disagrees.

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

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from llmopt.errors import first_line
from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass
from llmopt.core.rules import explain_rules
from llmopt.passes.fuse_guard import NumericGuard
from llmopt.passes.fuse_stages import FINISH, PLUMBING, STAGES, Stage

ATTENTION_MODES = ("auto", "gqa", "mha", "none")
FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate ops (SDPA, ...), not runnable


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    norm: bool = option(True, "RMSNorm / LayerNorm and their residual (skip) forms")
    rotary: bool = option(True, "rotary embeddings and their cos/sin caches")
    attention: str = option("auto", "auto (GroupQueryAttention where it matches, else MultiHeadAttention) | gqa | mha | none")
    pack_qkv: bool = option(True, "pack the Q/K/V projections feeding GroupQueryAttention into one MatMul")
    moe: bool = option(True, "routed mixture-of-experts blocks → MoE (their routing and activation checked numerically)")
    gelu: bool = option(True, "GELU forms → Gelu / FastGelu / BiasGelu")
    silu: bool = option(False, "x·Sigmoid(x) → QuickGelu(alpha=1) (off: no measurable gain on CPU, docs/benchmarks.md)")
    clear_metadata: bool = option(False, "drop node metadata and doc strings (exporter stack traces)")
    guard: bool = option(True, "keep a group of rewrites only if the graph still computes what it did "
                               "(ONNX Runtime, batch 2, with and without past); roll it back otherwise")

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            from llmopt.errors import PipelineError

            raise PipelineError(f"fuse: attention={self.attention!r} is not one of {', '.join(ATTENTION_MODES)}")


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
        self._run_span(model, [(FINISH,)])
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
            if isinstance(n, tuple):  # (count, notes): what a function stage found and left alone, and why
                n, notes = n
                for note in notes:
                    self.warn(f"{stage.name}: {note}")
                    if self.explain:
                        self.explain_why(stage=stage.name, rule=stage.name, status="left unfused", reason=note,
                                         matched_nodes=0)
            if n and stage.shape_inference:
                common_passes.ShapeInferencePass()(model)
        else:
            n = stage.rules.apply_to_model(model)
            if n and stage.shape_inference:
                common_passes.ShapeInferencePass()(model)
            if not n and self.explain:
                for entry in explain_rules(model, stage.rules):
                    self.explain_why(stage=stage.name, **entry)
        if n and stage.name not in PLUMBING:
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

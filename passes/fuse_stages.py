"""The `fuse` pass's stages: an ordered table of named steps, each a rule set or a function.

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
moe                    routed expert block (router → top-k → expert MLPs →     llmopt
                       weighted sum) → ``MoE`` (fuse_moe.py)
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

llmopt's own rules either put today's exports into the form the fusion patterns expect, or finish
what those fusions leave for ONNX Runtime: ``fuse_linear.py`` (linear layers), ``fuse_shapes.py``
(shapes), ``fuse_rotary.py`` (rotary embeddings), ``fuse_attention.py`` (attention),
``fuse_moe.py`` (mixture-of-experts blocks),
``fuse_activations.py`` (GELU, SiLU) and ``fuse_canonical.py`` (TorchScript's idioms).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

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

from llmopt.passes import fuse_canonical as canon
from llmopt.passes.fuse_activations import FastGeluBias, GeluTanhHalfFirst, SiluAsQuickGelu
from llmopt.passes.fuse_attention import PackQKV, ScaledGQA, SlicedQKV, SoftcapSDPA, gqa_seqlens_from_mask
from llmopt.passes.fuse_linear import FlattenedLinear, gemm_to_matmul
from llmopt.passes.fuse_moe import fuse_moe
from llmopt.passes.fuse_rotary import RotaryAngles, rotary_positions_per_row
from llmopt.passes.fuse_shapes import IdentityReshape, canonical_dims

if TYPE_CHECKING:
    from llmopt.passes.fuse import FuseOptions


@dataclasses.dataclass(frozen=True)
class Stage:
    """One named step: a rule set (counted, explainable) or a function returning a count."""

    name: str
    rules: pattern.RewriteRuleSet | None = None
    func: Callable[[ir.Model], int | tuple[int, list[str]]] | None = None  # a count, or (count, notes)
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
        n += pattern.RewriteRuleSet([IdentityReshape.rule()]).apply_to_model(model)
        common_passes.IdentityEliminationPass()(model)
    return n


def _cse(model: ir.Model) -> int:
    common_passes.CommonSubexpressionEliminationPass()(model)
    return 0


_attn = lambda *modes: (lambda o: o.attention in modes)  # noqa: E731

STAGES: tuple[Stage, ...] = (
    Stage("gemm_to_matmul", func=gemm_to_matmul),
    Stage("rotary_angles", _rules(RotaryAngles.rule()), enabled=lambda o: o.rotary),
    Stage("identity_reshape", _rules(IdentityReshape.rule())),
    Stage("flattened_linear", _rules(*(FlattenedLinear.rule(b, "reshape") for b in (True, False)))),
    Stage("expand_shape", func=canon.expand_shape),
    Stage("reshape_dims_from_shape", func=canon.reshape_dims_from_shape),
    Stage("static_dims", func=canon.static_dims),
    Stage("scalar_where", func=canon.scalar_where),
    Stage("reciprocal_div", _rules(canon.ReciprocalDiv.rule())),
    Stage("prepare", func=_prepare),
    Stage("reinfer_shapes", func=canon.reinfer_shapes),
    # again, with the shapes the first round made known (TorchScript's chains resolve in two steps)
    Stage("canonical_round_two", func=lambda m: _round_two(m)),
    Stage("identity_reshape", _rules(IdentityReshape.rule())),
    Stage("drop_identity", func=lambda m: int(common_passes.IdentityEliminationPass()(m).modified)),
    Stage("canonical_dims", func=canonical_dims),
    Stage("moe", func=fuse_moe, enabled=lambda o: o.moe, group="moe"),
    Stage("erf_gelu", erfgelu.rules, enabled=lambda o: o.gelu),
    Stage("rms_normalization", rms_normalization.rms_normalization_ruleset, enabled=lambda o: o.norm),
    Stage("skip_layer_normalization", skip_normalization.skip_layer_normalization_ruleset, enabled=lambda o: o.norm),
    Stage("skip_rms_normalization", skip_normalization.skip_rms_normalization_ruleset, enabled=lambda o: o.norm),
    Stage("rotary_embedding", rotary_embedding.rotary_embedding_rules, enabled=lambda o: o.rotary),
    Stage("cos_sin_cache", cos_sin_cache.cos_sin_cache_rules, enabled=lambda o: o.rotary, group="rotary"),
    Stage("cse", func=_cse, group="rotary"),
    Stage("partial_rotary_embedding", rotary_embedding.partial_embedding_rules, enabled=lambda o: o.rotary, group="rotary"),
    Stage("rotary_positions_per_row", func=rotary_positions_per_row, enabled=lambda o: o.rotary, group="rotary"),
    Stage("rotary_shapes", func=canon.rotary_shapes, enabled=lambda o: o.rotary, group="rotary"),
    Stage("reshapes_after_rotary", func=lambda m: _reshapes_again(m), enabled=lambda o: o.rotary, group="rotary"),
    Stage("sdpa", sdpa.sdpa_rules, enabled=_attn("auto", "gqa", "mha"), shape_inference=True, group="attention"),
    Stage("sdpa_softcap", _rules(SoftcapSDPA.rule()), enabled=_attn("auto", "gqa", "mha"), shape_inference=True,
          group="attention"),
    Stage("canonical_dims_after_sdpa", func=canonical_dims, enabled=_attn("auto", "gqa", "mha"), group="attention"),
    Stage("gqa", _rules(ScaledGQA.rule()), enabled=_attn("auto", "gqa"), group="attention"),
    Stage("gqa_seqlens_from_mask", func=gqa_seqlens_from_mask, enabled=_attn("auto", "gqa"), group="attention"),
    Stage("pack_qkv", _rules(*(PackQKV.rule(b, p) for b in (False, True) for p in (True, False))),
          enabled=lambda o: o.pack_qkv and o.attention in ("auto", "gqa"), group="attention"),
    Stage("packed_qkv_for_gqa", gqa_packed_qkv.fuse_qkv_gqa_rules, enabled=_attn("auto", "gqa"), group="attention"),
    Stage("sliced_qkv", _rules(SlicedQKV.rule(True), SlicedQKV.rule(False)), enabled=_attn("auto", "gqa"), group="attention"),
    Stage("mha1", mha.mha_rules_with_past, enabled=_attn("auto", "mha"), group="attention"),
    Stage("mha2", mha.mha_rules_no_past, enabled=_attn("auto", "mha"), group="attention"),
    Stage("mha_scale", mha_scale._mha_scale_rules, enabled=_attn("auto", "mha"), group="attention"),
    Stage("mha_bias", mha_bias.mha_bias_rules, enabled=_attn("auto", "mha"), group="attention"),
    Stage("sdpa_via_mha", sdpa_via_mha._rules, enabled=_attn("auto", "mha"), group="attention"),
    Stage("flattened_linear_after_mha", _rules(*(FlattenedLinear.rule(b, "mha") for b in (True, False))),
          enabled=_attn("auto", "mha"), group="attention"),
    Stage("gelu", gelu.gelu_rules, enabled=lambda o: o.gelu),
    Stage("gelu_half_first", _rules(GeluTanhHalfFirst.rule()), enabled=lambda o: o.gelu),
    Stage("fast_gelu_bias", _rules(FastGeluBias.rule()), enabled=lambda o: o.gelu),
    Stage("bias_gelu", bias_gelu.bias_gelu_rules, enabled=lambda o: o.gelu),
    Stage("silu", pattern.RewriteRuleSet([SiluAsQuickGelu.rule()], commute=True), enabled=lambda o: o.silu),
)

# Stages that are plumbing, not fusions: never counted or explained.
PLUMBING = {"prepare", "reinfer_shapes", "reshapes_after_rotary", "drop_identity", "rotary_shapes", "cse", "canonical_dims", "canonical_dims_after_sdpa"}


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


FINISH = Stage("finish", func=_finish)
PLUMBING.add("finish")

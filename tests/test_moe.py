"""Mixture-of-experts decoders (issue 15, first part): exported with transformers' ``batched_mm``
experts (a form torch.onnx traces), compiled with the targets' defaults, verified against the
export, and generating what full recomputation of the export generates. Two architectures in the
default run (Mixtral's experts; Qwen2-MoE's shared expert and its gate); all of them, at three
targets, with ``-m slow``."""

import pytest

import llmopt
from llmopt.models.architectures import MOE
from llmopt.ort.generation import Generator, greedy_by_recompute

PROMPT = [5, 9, 14, 3]
SLOW = pytest.mark.slow


def _compile_and_generate(exported, arch, tmp_path, targets):
    src = exported(arch)  # with KV-cache I/O
    for target in targets:
        art = llmopt.compile(src, target=target, out=tmp_path / target, measure_speed=False)
        assert art.manifest["verification"]["passed"], (target, art.manifest["verification"])
        if target == "cpu-fp32":
            assert art.manifest["verification"]["figures"]["max_abs"] < 1e-4
            assert Generator(art.path).generate([PROMPT], 32).tokens[0] == greedy_by_recompute(src, PROMPT, 32)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_decoders_export_compile_and_generate(exported, arch, tmp_path):
    _compile_and_generate(exported, arch, tmp_path, ["cpu-fp32"])


# Random tiny weights miss two targets' default budgets (measured 2026-12-03): Granite-MoE's logits
# are nearly flat, so int4 keeps cosine 0.987 but no argmax (top-1 0.0 < 0.4); gpt-oss at int8 has
# cosine 0.98915 < 0.99. Strict: when they start passing, the marks must go.
_MISSES = {"granitemoe": "cpu-int4 top-1 0.0 on flat random logits", "gpt_oss": "cpu-int8 cosine 0.989 < 0.99"}


@SLOW
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.xfail(strict=True, reason=_MISSES[a]))
                                  if a in _MISSES else a for a in MOE])
def test_every_moe_architecture_at_every_cpu_target(exported, arch, tmp_path):
    _compile_and_generate(exported, arch, tmp_path, ["cpu-fp32", "cpu-int8", "cpu-int4"])

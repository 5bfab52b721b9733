"""`cpu-fp32`: optimize only; numerics must match the source to float rounding."""

from llmopt.core.registry import register_target
from llmopt.targets.base import Target
from llmopt.ort.verify import Thresholds
CPU_FP32 = register_target(
    Target(
        name="cpu-fp32",
        description="fp32 graph optimized for the ONNX Runtime CPU execution provider",
        provider="CPUExecutionProvider",
        pipeline="fold,cleanup,fuse,kv-cache,logits-to-keep,cleanup",
        thresholds=Thresholds(max_abs=1e-3, min_cosine=0.99999),
        session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    )
)

"""`cpu-int8`: int8 weights with dynamic int8 activations (ONNX Runtime CPU)."""

from llmopt.core.registry import register_target
from llmopt.targets.base import Target
from llmopt.ort.verify import Thresholds
CPU_INT8 = register_target(
    Target(
        name="cpu-int8",
        description="int8 weights (symmetric, per channel), activations quantized at run time; ONNX Runtime CPU",
        provider="CPUExecutionProvider",
        pipeline="fold,cleanup,fuse,kv-cache,logits-to-keep,quantize-moe{bits=8,block_size=128},quantize-dynamic,cleanup",
        thresholds=Thresholds(min_cosine=0.99, min_top1=0.5),
        session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    )
)

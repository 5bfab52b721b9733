"""`cuda-fp16`: fused graph in float16 (weights, activations, KV cache; logits float32) for the CUDA
execution provider. Verified on the CPU provider here; every op must be one the CUDA provider
implements."""

from llmopt.core.registry import register_target
from llmopt.targets.base import Target
from llmopt.targets.cuda_ops import CUDA_OPS
from llmopt.ort.verify import Thresholds
CUDA_FP16 = register_target(
    Target(
        name="cuda-fp16",
        description="float16 weights, activations and KV cache (float32 logits), fused attention and norms; "
                    "CUDA execution provider (checked on CPU)",
        provider="CUDAExecutionProvider",
        pipeline="fold,cleanup,fuse,kv-cache,logits-to-keep,fp16,cleanup",
        thresholds=Thresholds(min_cosine=0.999, min_top1=0.9),
        session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
        verify_providers=("CPUExecutionProvider",),
        supported_ops=CUDA_OPS,
    )
)

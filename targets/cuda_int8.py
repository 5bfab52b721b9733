"""`cuda-int8`: QDQ int8 (symmetric per-channel weights, symmetric calibrated activations), as the
CUDA and TensorRT execution providers consume it. Verified on the CPU provider here, with the QDQ
graph computed as written (sessions.QDQ_AS_WRITTEN); every op must be one the CUDA provider implements."""

from llmopt.core.registry import register_target
from llmopt.targets.base import Target
from llmopt.targets.cuda_ops import CUDA_OPS
from llmopt.ort.verify import Thresholds
from llmopt.ort.sessions import QDQ_AS_WRITTEN
CUDA_INT8 = register_target(
    Target(
        name="cuda-int8",
        description="int8 QDQ: symmetric per-channel weights, symmetric calibrated activations; "
                    "CUDA / TensorRT execution providers (checked on CPU)",
        provider="CUDAExecutionProvider",
        pipeline="fold,cleanup,fuse,kv-cache,logits-to-keep,qdq{activations=int8,per_channel=true,method=percentile},cleanup",
        thresholds=Thresholds(min_cosine=0.98, min_top1=0.5),
        session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
        verify_providers=("CPUExecutionProvider",),
        verify_session_config=QDQ_AS_WRITTEN,
        supported_ops=CUDA_OPS,
    )
)

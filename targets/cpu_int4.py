"""`cpu-int4`: 4-bit blockwise weights (MatMulNBits, block 32, int8 compute), ONNX Runtime CPU."""

from llmopt.core.registry import register_target
from llmopt.targets.base import Target
from llmopt.ort.verify import Thresholds
CPU_INT4 = register_target(
    Target(
        name="cpu-int4",
        description="int4 weights, blocks of 32 with zero points, GPTQ where calibration text is available, "
                    "block ranges searched; embedding tables at 8 bits; MatMulNBits with int8 compute "
                    "(accuracy_level 4); ONNX Runtime CPU",
        provider="CPUExecutionProvider",
        pipeline="fold,cleanup,fuse,kv-cache,logits-to-keep,quantize-moe{bits=4,block_size=32,symmetric=false},weight-only{bits=4,block_size=32,method=auto,accuracy_level=4,scales=search,table_bits=8},cleanup",
        thresholds=Thresholds(min_cosine=0.97, min_top1=0.4),
        session_options={"graph_optimization_level": "ORT_ENABLE_ALL"},
    )
)

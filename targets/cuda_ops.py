"""The operators the ONNX Runtime CUDA execution provider implements, as far as LLM graphs use them.

From ONNX Runtime's kernel registrations (docs/OperatorKernels.md, "CUDAExecutionProvider", ORT 1.2x):
the standard ops decoders export to, and the com.microsoft contrib ops llmopt's passes emit. An
op that is not here (e.g. the CPU-only ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``) would
fall back to the CPU provider, copying activations across the bus every step, so a CUDA target
refuses it at compile time instead.
"""

STANDARD = frozenset("""
Abs Add And ArgMax Cast Ceil Clip Concat Constant ConstantOfShape Cos CumSum DequantizeLinear Div Einsum
Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater GreaterOrEqual Identity
If IsInf IsNaN LayerNormalization Less LessOrEqual Log MatMul MatMulInteger Max Mean Min Mod Mul Neg Not
Or Pad Pow QuantizeLinear Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape
ScatterElements ScatterND Shape Sigmoid SimplifiedLayerNormalization Sin Size Slice Softmax Split Sqrt
Squeeze Sub Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())

CONTRIB = frozenset("""
Attention BiasAdd BiasGelu BiasSoftmax FastGelu FusedMatMul GatedRelativePositionBias GemmFastGelu
GroupQueryAttention MatMulBnb4 MatMulNBits MoE MultiHeadAttention PackedMultiHeadAttention QMoE QuickGelu
RotaryEmbedding SimplifiedLayerNormalization SkipLayerNormalization SkipSimplifiedLayerNormalization
""".split())

CUDA_OPS = frozenset({("", op) for op in STANDARD} | {("com.microsoft", op) for op in CONTRIB})

"""Quantization, PyTorch PT2E's split: sites (which MatMul weights), specs (the integer grid),
and lowerings (one function per ONNX Runtime kernel)."""

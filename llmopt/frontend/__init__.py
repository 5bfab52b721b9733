"""Frontend: bringing a model in (torch.onnx export of Hugging Face decoders, the export cache,
quantization-aware training) and reading one (``llmopt inspect``)."""

"""The ONNX Runtime side: sessions and numerical verification, the generation loop, bench,
perplexity, calibration, side-by-side timing, and the machine a figure was measured on."""

"""Model recipes: small Hugging Face configs per architecture (random weights, for
tests and benchmarks) and the trained reference model (``reference/``)."""

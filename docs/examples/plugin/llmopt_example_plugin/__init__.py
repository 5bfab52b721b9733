"""An example llmopt plugin package (see docs/writing-passes.md)."""

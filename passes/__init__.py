"""Built-in llmopt passes, one module per pass (or pass family).

Importing a module registers its passes; ``llmopt.core.registry`` imports them all.
"""

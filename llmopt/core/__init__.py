"""Pass infrastructure: the pass contract, registries, pipelines, the pass manager, plugins,
pattern rules, and the model I/O every pass stands on."""

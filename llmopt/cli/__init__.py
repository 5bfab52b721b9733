"""The `llmopt` command line (typer app in ``app``)."""

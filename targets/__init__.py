"""Built-in compile targets, one module per target; each registers a ``Target``."""

"""The exception family that carries user-facing messages.

The CLI prints an ``LlmoptError`` as one line and exits with its ``exit_code``;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (for one-line errors), or its type name."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


class LlmoptError(Exception):
    """A problem the user can fix. The message says what, where, and what to do."""

    exit_code = 2


class InputError(LlmoptError):
    """A model path, file or directory that cannot be used."""


class PipelineError(LlmoptError):
    """An unknown pass or target, a bad option, or a malformed pipeline string/recipe."""


class OutputError(LlmoptError):
    """An output path that cannot be written safely."""


class MissingDependencyError(LlmoptError):
    """An optional dependency (torch, transformers, ...) is needed and not installed."""


class PluginError(LlmoptError):
    """A user's pass failed: it did not import, raised, broke the graph or its numerics (exit code 1)."""

    exit_code = 1


class VerificationError(LlmoptError):
    """The compiled model misses the target's accuracy thresholds (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report

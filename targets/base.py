"""A target is data: a pipeline of named passes, an execution provider with its
session options, verification thresholds, and what the artifact holds."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmopt.core.pipeline import Pipeline, parse
from llmopt.ort.verify import Thresholds
ARTIFACT_FILES = ("model.onnx", "model.onnx.data", "llmopt.json")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    provider: str
    pipeline: str
    thresholds: Thresholds
    session_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Providers the compile-time verification runs the artifact with (CPU here,
    # so CUDA targets can be checked on machines without a GPU).
    verify_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Session config entries for that verification (cuda-int8: QDQ computed as written, see
    # sessions.QDQ_AS_WRITTEN, so a CPU's integer kernels do not stand in for the GPU's).
    verify_session_config: dict[str, str] = dataclasses.field(default_factory=dict)
    emits: tuple[str, ...] = ARTIFACT_FILES
    # (domain, op_type) pairs the provider implements; the compile fails on any other op. None: no check.
    supported_ops: frozenset[tuple[str, str]] | None = None

    def unsupported_ops(self, model) -> list[str]:
        """Ops in ``model`` the target's provider does not implement (empty without a list)."""
        if self.supported_ops is None:
            return []
        found = {(n.domain if n.domain != "ai.onnx" else "", n.op_type) for n in model.graph}
        return sorted(f"{d + '::' if d else ''}{op}" for d, op in found - self.supported_ops)

    def parsed_pipeline(self) -> Pipeline:
        return parse(self.pipeline)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "provider": self.provider,
            "session_options": dict(self.session_options),
            "pipeline": self.pipeline,
            "thresholds": self.thresholds.as_dict(),
            "verify_providers": list(self.verify_providers),
            "verify_session_config": dict(self.verify_session_config),
            "emits": list(self.emits),
        }

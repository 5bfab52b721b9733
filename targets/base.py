"""A target is data: a pipeline of named passes, an execution provider with its
session options, verification thresholds, and what the artifact holds."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmopt.compiler.publish import ARTIFACT_FILES
from llmopt.core.pipeline import Pipeline, parse
from llmopt.ort.verify import Thresholds

# ONNX Runtime's graph optimization levels, as session_options names them, and as
# llmopt.ort.sessions.make_session(optimization=...) takes them
OPTIMIZATION_LEVELS = {"ORT_DISABLE_ALL": "disable", "ORT_ENABLE_BASIC": "basic",
                       "ORT_ENABLE_EXTENDED": "extended", "ORT_ENABLE_ALL": "all"}


@dataclasses.dataclass(frozen=True)
class Target:
    """``session_options``: the ONNX Runtime session options the artifact is meant to run with. They
    are recorded in the manifest (for whoever deploys the artifact) and applied to the sessions the
    compile runs the artifact in to measure it as it will run (speed and perplexity,
    ``llmopt.compiler.measure.artifact_session``). Only options llmopt can apply are accepted:
    ``graph_optimization_level`` (one of ``OPTIMIZATION_LEVELS``); any other key is refused when the
    target is defined, so the manifest never records a setting nothing applied. The numeric
    verification has its own settings: ``verify_providers`` and ``verify_session_config``.

    ``emits``: every file an artifact of this target can hold (``llmopt.compiler.publish.ARTIFACT_FILES``):
    model.onnx, model.onnx.data and llmopt.json always; genai_config.json for a decoder with a KV
    cache; tokenizer.json, tokenizer_config.json and special_tokens_map.json when the source has them.
    """

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

    def __post_init__(self) -> None:
        for key, value in self.session_options.items():
            if key != "graph_optimization_level":
                raise ValueError(f"target '{self.name}': session option '{key}' is not one llmopt applies; "
                                 "use graph_optimization_level, or leave it out")
            if value not in OPTIMIZATION_LEVELS:
                raise ValueError(f"target '{self.name}': graph_optimization_level '{value}' is not one of "
                                 f"{', '.join(OPTIMIZATION_LEVELS)}")

    def session_kwargs(self) -> dict[str, Any]:
        """``session_options`` as keywords of ``llmopt.ort.sessions.make_session``."""
        level = self.session_options.get("graph_optimization_level")
        return {} if level is None else {"optimization": OPTIMIZATION_LEVELS[level]}

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

"""The manifest: the artifact's ``llmopt.json``, also what ``llmopt compile --json`` prints, what
``--report`` writes (on failure too) and ``llmopt.compile(...).manifest``.

Its JSON Schema is ``llmopt/schemas/compile-report.v1.json`` (``SCHEMA`` names it; bump the
version on an incompatible change). ``build`` fills in what the compile knows once the artifact is
staged; ``verification``, ``speed``, ``accuracy`` and ``gates`` are filled in by the measurements
that follow (``llmopt.compiler.measure``), ``seconds`` last, when the compile succeeded.
"""

from __future__ import annotations

import datetime
import json
import platform
from typing import Any

from llmopt import __version__
from llmopt.compiler.plan import Plan
from llmopt.compiler.publish import Staged
from llmopt.compiler.run import Loaded
from llmopt.core import experts, graph_util, model_io
from llmopt.core.manager import PipelineResult
from llmopt.frontend.inspector import kv_cache_info
from llmopt.ort import machine
from llmopt.quant.spec import QUANT_ERROR_KEY

SCHEMA = "llmopt/compile-report/v1"  # llmopt/schemas/compile-report.v1.json


def build(plan: Plan, loaded: Loaded, result: PipelineResult, staged: Staged) -> dict[str, Any]:
    """The manifest of a staged artifact, before verification and measurements."""
    target, model = plan.target, result.model
    source = source_section(plan, loaded)
    artifact_bytes = sum(size for name, size in staged.files.items() if name.startswith(model_io.MODEL_FILE))
    return {
        "schema": SCHEMA,
        "llmopt_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpu": machine.cpu_model()},
        "target": target.as_dict(),
        "provider": target.provider,
        "session_options": dict(target.session_options),
        "source": source,
        "pipeline": str(plan.pipeline),
        "passes": [r.as_dict() for r in result.records],
        "warnings": result.warnings,
        "constraints": io_constraints(model),
        "io": graph_util.io_signature(model),
        "kv_cache": kv_cache_info(model),
        "generation": staged.generation,
        "sparsity": json.loads(model.metadata_props.get("llmopt.sparsity", "null")),
        "quantization_error": json.loads(model.metadata_props.get(QUANT_ERROR_KEY, "null")),
        "artifact": {
            "files": staged.files,
            "bytes": artifact_bytes,  # the graph and its weights
            "size_ratio": round(artifact_bytes / source["bytes"], 4) if source["bytes"] else None,
            "nodes": graph_util.node_count(model),
            "source_nodes": loaded.nodes,
            "ops": graph_util.op_histogram(model),
            "source_ops": loaded.ops,
            "experts": experts.parameter_split(model),  # mixture of experts: total vs active per token
        },
        "verification": None,
        "speed": None,
        "accuracy": None,
        "gates": [],
    }


def source_section(plan: Plan, loaded: Loaded) -> dict[str, Any]:
    """What was compiled: the ONNX files' hash, or a Hugging Face directory's (and how it was exported)."""
    if plan.hf_dir is not None:
        hashed = sorted(f for f in plan.hf_dir.iterdir() if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"))
        section = {
            "kind": "huggingface",
            "path": str(plan.hf_dir),
            "sha256": model_io.sha256_files(hashed),
            "hashed_files": [f.name for f in hashed],
            "export": {"with_past": plan.options.with_past, "seconds": loaded.export_seconds},
        }
    else:
        section = {"kind": "onnx", "path": str(loaded.file), "sha256": model_io.sha256_files(loaded.files)}
    section["bytes"] = model_io.files_bytes(loaded.files)
    return section


def io_constraints(model) -> list[str]:
    """What callers of the compiled graph must respect beyond its signature."""
    notes = []
    if any(n.op_type == "GroupQueryAttention" for n in model.graph):
        notes.append(
            "GroupQueryAttention: sequence lengths are read from attention_mask's sum, so padding must be on "
            "the right; a step with several new tokens and a non-empty cache must have batch 1"
        )
    return notes

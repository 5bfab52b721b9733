"""Publish: the artifact directory built beside its destination and put in place whole.

``staging(out)`` gives a fresh directory beside ``out`` (removed whatever happens); ``stage`` writes
the compiled graph, its weights and what a runtime needs next to them into it; ``publish`` adds
the manifest and swaps the directory into place in one step (``llmopt.core.atomic.publish_dir``).
A compile that fails before ``publish`` leaves nothing at ``out`` (a previous artifact there is
unchanged). ``ARTIFACT_FILES`` is every name ``stage`` and ``publish`` can write: a target's
``emits``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

from llmopt.compiler import genai
from llmopt.compiler.preflight import ARTIFACT_MANIFEST
from llmopt.core import atomic, model_io

MANIFEST = ARTIFACT_MANIFEST  # llmopt.json

# model.onnx, its weights and the manifest always; genai_config.json for a decoder with a KV cache;
# the tokenizer files the source has (a Hugging Face directory, or files next to the .onnx).
ARTIFACT_FILES = (model_io.MODEL_FILE, model_io.MODEL_FILE + model_io.DATA_SUFFIX, MANIFEST, genai.GENAI_CONFIG,
                  *genai.TOKENIZER_FILES)


@dataclasses.dataclass(frozen=True)
class Staged:
    files: dict[str, int]  # name -> bytes, the manifest not yet among them
    generation: dict[str, Any] | None  # EOS/BOS ids, context length... (None: no KV cache)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """An empty directory beside ``out`` that ``atomic.sweep(out)`` recognizes; removed on the way out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = atomic.staging_path(out)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stage(model, where: Path, source_dir: Path, provider: str) -> Staged:
    """Write ``model`` (external data), the source's tokenizer and, for a decoder with a KV cache,
    onnxruntime-genai's config into ``where``."""
    model_io.save(model, where / model_io.MODEL_FILE)
    cfg = genai.hf_config(source_dir)
    tokenizer = genai.copy_tokenizer([source_dir], where)
    generation = genai.generation_info(model, cfg)
    if generation is not None:
        generation["tokenizer"] = bool(tokenizer)
        gcfg = genai.genai_config(model, cfg, provider)
        if gcfg is not None:
            write_json(where / genai.GENAI_CONFIG, gcfg)
    files = {f.name: f.stat().st_size for f in sorted(where.iterdir())}
    unexpected = set(files) - set(ARTIFACT_FILES)
    if unexpected:  # a bug: ARTIFACT_FILES (what targets declare they emit) must name every file
        raise AssertionError(f"staged files missing from ARTIFACT_FILES: {sorted(unexpected)}")
    return Staged(files, generation)


def publish(where: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into the staged directory ``where`` and put it at ``out`` in one step."""
    write_json(where / MANIFEST, manifest)
    atomic.publish_dir(where, out)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    atomic.write_atomic(Path(path), json.dumps(data, indent=2, default=str) + "\n")

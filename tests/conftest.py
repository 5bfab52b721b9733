"""Shared fixtures: tiny random-init Hugging Face models of every architecture,
exported once per test session (with and without KV-cache I/O)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the export cache of this session (subprocesses inherit it): never the user's, never a stale one
_CACHE = Path(__import__("tempfile").mkdtemp(prefix="llmopt-test-cache-"))
os.environ["LLMOPT_CACHE_DIR"] = str(_CACHE)

from llmopt.models.architectures import ARCHITECTURES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """arch -> directory of a tiny random-init model (built lazily, once)."""
    from llmopt.models.architectures import build

    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build(arch, root / arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def exported(hf_dirs, tmp_path_factory):
    """(arch, with_past) -> exported .onnx path (exported lazily, once)."""
    from llmopt.frontend.exporter import export

    root = tmp_path_factory.mktemp("onnx")
    cache: dict[tuple[str, bool], Path] = {}

    def get(arch: str, with_past: bool = True) -> Path:
        key = (arch, with_past)
        if key not in cache:
            cache[key] = export(hf_dirs(arch), root / f"{arch}{'-past' if with_past else ''}.onnx", with_past=with_past)
        return cache[key]

    return get


@pytest.fixture
def llama_onnx(exported):
    return exported("llama", True)


@pytest.fixture(scope="session")
def exported_ids_only(hf_dirs, tmp_path_factory):
    """arch -> the first export people try, made by torch.onnx directly, not by llmopt:
    ``torch.onnx.export(model, (input_ids,), dynamo=True)``, logits out, no mask, no cache."""
    root = tmp_path_factory.mktemp("ids-only")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            from llmopt.models.architectures import export_input_ids_only

            cache[arch] = export_input_ids_only(hf_dirs(arch), root / f"{arch}-ids.onnx")
        return cache[arch]

    return get

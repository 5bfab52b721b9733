"""Exports are cached by the content of the model directory, the options and the library versions:
a second export of the same files is read back, never re-run; any changed file is a miss."""

import os

import numpy as np
import onnx_ir as ir
import pytest

import llmopt
from llmopt.frontend import export_cache
from llmopt.frontend.exporter import export


def _weights(path):
    model = llmopt.load(path)
    return {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}


def _no_exporter(*_a, **_k):
    raise AssertionError("the exporter ran: the cache missed")


def test_second_export_of_the_same_files_is_read_from_the_cache(hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    src = hf_dirs("llama")
    first = export(src, tmp_path / "a" / "model.onnx", with_past=True)
    entries = list((tmp_path / "cache" / "exports").iterdir())
    assert len(entries) == 1 and (entries[0] / "complete").is_file()
    monkeypatch.setattr("llmopt.frontend.exporter.load_hf_model", _no_exporter)
    second = export(src, tmp_path / "b" / "model.onnx", with_past=True)
    a, b = llmopt.load(first), llmopt.load(second)
    assert [n.op_type for n in a.graph] == [n.op_type for n in b.graph]
    assert dict(a.metadata_props) == dict(b.metadata_props)
    wa, wb = _weights(first), _weights(second)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "b" / "tokenizer.json").exists() == (src / "tokenizer.json").exists()
    # other options: another entry (the exporter must run, so it is needed again)
    monkeypatch.undo()
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    export(src, tmp_path / "c" / "model.onnx", with_past=False)
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 2


def test_a_changed_file_misses_and_a_half_entry_is_never_read(hf_dirs, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "hf"
    shutil.copytree(hf_dirs("llama"), src)
    k = export_cache.key(src, with_past=False, opset=20)
    export(src, tmp_path / "a.onnx")
    config = (src / "config.json").read_text()
    (src / "config.json").write_text(config + "\n")
    assert export_cache.key(src, with_past=False, opset=20) != k  # one byte more: another key
    (src / "config.json").write_text(config)
    assert export_cache.key(src, with_past=False, opset=20) == k
    (export_cache.root() / k / "complete").unlink()  # a writer killed before its marker
    assert export_cache.lookup(k) is None
    monkeypatch.setattr("llmopt.frontend.exporter.load_hf_model", _no_exporter)
    with pytest.raises(AssertionError, match="the cache missed"):
        export(src, tmp_path / "b.onnx")


def test_cache_off_and_size_cap(hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMOPT_EXPORT_CACHE", "0")
    export(hf_dirs("llama"), tmp_path / "a.onnx")
    monkeypatch.setenv("LLMOPT_EXPORT_CACHE", "1")
    monkeypatch.setenv("LLMOPT_EXPORT_CACHE_MAX_GB", "0.000001")  # ~1 KB: the tiny model is over it
    export(hf_dirs("llama"), tmp_path / "b.onnx")
    assert not (tmp_path / "cache" / "exports").exists() or not os.listdir(tmp_path / "cache" / "exports")
    assert ir.load(tmp_path / "b.onnx") is not None

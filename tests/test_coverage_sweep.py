"""The full coverage sweep (benchmarks/coverage.py, docs/coverage.md) as a slow test: every
architecture llmopt knows × three export forms, compiled to cpu-fp32 and cpu-int8 with the
targets' defaults. A row passes when its export is made, fuse keeps nothing that moves the fp32
logits by more than 1e-4, and both targets verify. The default suite covers every form on Llama
(test_foreign_exports.py, test_compile.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from llmopt.models.architectures import ARCHITECTURES, EXTRA

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("form", ["cache", "ids", "torchscript"])
@pytest.mark.parametrize("arch", ARCHITECTURES + tuple(EXTRA))
def test_row(arch, form, tmp_path):
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))  # its helpers (_common); appended: `coverage` must not shadow the package
    spec = importlib.util.spec_from_file_location("llmopt_coverage_sweep", BENCHMARKS / "coverage.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    row = sweep.run_row(arch, form, tmp_path)
    assert "export_error" not in row, row["export_error"]
    fp32, int8 = row["fp32"], row["int8"]
    assert "error" not in fp32, fp32["error"]
    assert fp32["passed"] and fp32["figures"]["max_abs"] <= 1e-4, fp32["figures"]
    assert "error" not in int8 and int8["passed"], int8

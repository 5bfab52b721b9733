"""QuantSpec: validation and the scale / zero-point arithmetic every quantizer shares."""

import numpy as np
import pytest

from llmopt.errors import PipelineError
from llmopt.quant.spec import QuantSpec


@pytest.mark.parametrize("dtype, symmetric", [("int8", True), ("uint8", False), ("uint4", False), ("int4", True), ("int8", False)])
def test_round_trip_error_is_at_most_half_a_step(dtype, symmetric):
    spec = QuantSpec(dtype=dtype, symmetric=symmetric)
    x = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32) * 3
    scale, zero = spec.scale_zero_point(x.min(axis=0), x.max(axis=0))
    q = spec.quantize(x, scale, zero)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    err = np.abs((q - zero) * scale - x)
    # symmetric ranges are ±amax over an even number of steps: the top value may clip by half a step more
    assert (err <= scale * (1.0 if symmetric else 0.5) + 1e-6).all()


def test_symmetric_unsigned_blocks_use_the_midpoint():
    spec = QuantSpec(dtype="uint4", symmetric=True, granularity="block", block_size=32)
    _, zero = spec.scale_zero_point(np.array([-1.0]), np.array([2.0]))
    assert zero.tolist() == [8]  # MatMulNBits' default zero point for 4 bits


def test_zero_is_exact():
    spec = QuantSpec(dtype="uint8", symmetric=False)
    scale, zero = spec.scale_zero_point(np.array(-0.3), np.array(5.1))
    assert spec.quantize(np.array(0.0), scale, zero) == zero


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "int3"}, "dtype"),
    ({"granularity": "row"}, "granularity"),
    ({"granularity": "block", "block_size": 48}, "power of two"),
    ({"calibration": "mse"}, "calibration"),
    ({"percentile": 30}, "percentile"),
    ({"dtype": "uint8", "symmetric": True}, "symmetric uint8"),
])
def test_invalid_specs_refuse(kwargs, match):
    with pytest.raises(PipelineError, match=match):
        QuantSpec(**kwargs)

"""What a quantized tensor is, apart from how it gets there (PyTorch PT2E's split).

A ``QuantSpec`` is frozen and validates itself: the integer type, symmetric or with a zero point,
the granularity (one scale per tensor, per channel along an axis, or per block of ``block_size``
elements along the reduction axis), and for activations how the range is calibrated.

It is the only integer arithmetic in llmopt, with one grid per spec:

- symmetric: ``scale = amax / levels`` and ``q = zero ± levels``, where ``levels`` is half the
  integer range rounded down (127 for 8 bits, 7 for 4 bits; 63 with ``reduce_range``, 7-bit
  weights that no x86 integer kernel saturates) and ``zero`` is 0 for signed types and the
  midpoint (128, 8) for unsigned ones, which is MatMulNBits' default zero point. ``amax`` lands on
  an integer, so nothing is clipped. ``narrow_range=False`` (activations) spends the signed type's
  extra level instead: ``scale = amax / 127.5`` over ``-128..127``, so +amax saturates by half a
  step; calibrated activation ranges clip by design, and the finer step measures better
  (docs/benchmarks.md). Weights keep the narrow range (TFLite's convention);
- asymmetric: ``scale = (hi - lo) / (qmax - qmin)`` over the range widened to hold 0, and a zero
  point that makes 0 exact.

``llmopt.quant.quantize`` applies a spec to a whole weight (round to nearest or GPTQ).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from llmopt.errors import PipelineError

DTypes = Literal["int8", "uint8", "int4", "uint4"]
_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Quantizing passes record, per weight, how far the quantized values are from the float ones:
# model.metadata_props[QUANT_ERROR_KEY] = JSON {weight name: {"rel_rmse": float, "pass": name, ...}}.
QUANT_ERROR_KEY = "llmopt.quant_error"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    dtype: DTypes = "int8"
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "block"] = "tensor"
    axis: int = 1  # channel: the axis that keeps one scale per index (1 = output columns of a MatMul weight)
    block_size: int = 128  # block: elements per scale along the reduction axis
    calibration: str = "minmax"  # activations only
    percentile: float = 99.99
    reduce_range: bool = False  # symmetric only: half the levels (int8 -> -63..63, "7-bit")
    narrow_range: bool = True  # symmetric only: False = the full signed range, amax / 127.5 (activations)

    def __post_init__(self):
        if self.dtype not in _RANGE:
            raise PipelineError(f"quant spec: dtype {self.dtype!r} is not one of {', '.join(_RANGE)}")
        if self.granularity not in ("tensor", "channel", "block"):
            raise PipelineError(f"quant spec: granularity {self.granularity!r} is not tensor, channel or block")
        if self.granularity == "block" and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise PipelineError(f"quant spec: block_size must be a power of two >= 16, got {self.block_size}")
        if self.calibration not in CALIBRATION_METHODS:
            raise PipelineError(f"quant spec: calibration {self.calibration!r} is not one of {', '.join(CALIBRATION_METHODS)}")
        if not 50 < self.percentile <= 100:
            raise PipelineError(f"quant spec: percentile must be in (50, 100], got {self.percentile}")
        if (self.reduce_range or not self.narrow_range) and not self.symmetric:
            raise PipelineError("quant spec: reduce_range and narrow_range are for symmetric specs")
        if self.symmetric and self.dtype in ("uint8", "uint4") and self.granularity != "block":
            raise PipelineError(f"quant spec: symmetric {self.dtype} has no room for negative values; use int8/int4")

    @property
    def qmin(self) -> int:
        return _RANGE[self.dtype][0]

    @property
    def qmax(self) -> int:
        return _RANGE[self.dtype][1]

    @property
    def bits(self) -> int:
        """Bits the integers really use (7 for a reduced-range int8 spec)."""
        return (4 if self.dtype.endswith("4") else 8) - (1 if self.reduce_range else 0)

    @property
    def levels(self) -> int:
        """Symmetric specs: the largest ``|q - zero|``."""
        return (self.qmax - self.qmin) // 2 >> (1 if self.reduce_range else 0)

    @property
    def midpoint(self) -> int:
        """The symmetric zero point: 0 for signed types, 128 / 8 for unsigned ones."""
        return (self.qmax + self.qmin + 1) // 2

    def scale_zero_point(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point that map [lo, hi] (broadcastable arrays) onto the integer range."""
        lo = np.minimum(np.asarray(lo, np.float64), 0.0)
        hi = np.maximum(np.asarray(hi, np.float64), 0.0)
        if self.symmetric:
            scale = np.maximum(np.abs(lo), np.abs(hi)) / (self.levels if self.narrow_range else (self.qmax - self.qmin) / 2)
            zero = np.full_like(scale, self.midpoint)
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
            zero = np.where(scale > 0, np.rint(self.qmin - lo / np.where(scale > 0, scale, 1)), 0)
            zero = np.clip(zero, self.qmin, self.qmax)
        scale = np.where(scale > 0, scale, 1.0)
        return scale.astype(np.float32), zero.astype(np.int32)

    def quantize(self, x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """Integers (zero point included, int32) of ``x`` on the grid ``scale``, ``zero`` (broadcast)."""
        narrow = self.symmetric and self.narrow_range
        lo, hi = (self.midpoint - self.levels, self.midpoint + self.levels) if narrow else (self.qmin, self.qmax)
        return np.clip(np.rint(x / scale) + zero, lo, hi).astype(np.int32)


def blocks(w: np.ndarray, block: int) -> np.ndarray:
    """``w`` [K, N] → [N, n_blocks, block], zero-padded along K: MatMulNBits' block layout."""
    k, n = w.shape
    nb = -(-k // block)
    wt = np.zeros((n, nb * block), dtype=np.float32)
    wt[:, :k] = w.T
    return wt.reshape(n, nb, block)

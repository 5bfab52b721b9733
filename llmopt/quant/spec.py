"""What a quantized tensor is, apart from how it gets there (PyTorch PT2E's split).

A ``QuantSpec`` is frozen and validates itself: the integer type, symmetric or with a zero point,
the granularity (one scale per tensor, per channel along an axis, or per block of ``block_size``
elements along the reduction axis), and for activations how the range is calibrated.
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
        return 4 if self.dtype.endswith("4") else 8

    def scale_zero_point(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point that map [lo, hi] (broadcastable arrays) onto the integer range."""
        lo = np.minimum(np.asarray(lo, np.float64), 0.0)
        hi = np.maximum(np.asarray(hi, np.float64), 0.0)
        if self.symmetric:
            amax = np.maximum(np.abs(lo), np.abs(hi))
            scale = amax / ((self.qmax - self.qmin) / 2)
            zero = np.full_like(scale, (self.qmax + self.qmin + 1) // 2)  # 0 for int8/int4, 128/8 for unsigned
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
            zero = np.where(scale > 0, np.rint(self.qmin - lo / np.where(scale > 0, scale, 1)), 0)
            zero = np.clip(zero, self.qmin, self.qmax)
        scale = np.where(scale > 0, scale, 1.0)
        return scale.astype(np.float32), zero.astype(np.int32)

    def quantize(self, x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(x / scale) + zero, self.qmin, self.qmax).astype(np.int32)

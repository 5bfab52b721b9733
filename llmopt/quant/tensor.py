"""A quantized weight (``QTensor``) and the one way to make one: ``quantize(w, spec)``, round to
nearest or GPTQ, for every granularity a ``QuantSpec`` names."""

from __future__ import annotations

import dataclasses

import numpy as np

from llmopt.quant.error import block_error, dense_error
from llmopt.quant.spec import QuantSpec, blocks


@dataclasses.dataclass
class QTensor:
    """Integers with their zero point added (int32), float32 scales and int32 zero points.

    Layout by granularity, for a weight ``w`` [K, N] (reduction axis first, as a MatMul reads it):
    ``block``: ``q`` [N, n_blocks, block] (MatMulNBits' order, K zero-padded), ``scale`` and
    ``zero`` [N, n_blocks]; ``channel`` / ``tensor``: ``q`` shaped like ``w``, ``scale`` and
    ``zero`` broadcastable against it (kept dimensions; 0-d per tensor)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    spec: QuantSpec
    method: str = "rtn"  # or "gptq"

    @property
    def signed(self) -> np.ndarray:
        """``q - zero`` as int8 (symmetric 8-bit specs: what DynamicQuantizeMatMul and QDQ store)."""
        return (self.q - self.zero).astype(np.int8)

    def error(self, w: np.ndarray) -> float:
        """Relative RMS error ``‖deq − w‖ / ‖w‖``, in bounded chunks."""
        if self.spec.granularity == "block":
            return block_error(w, self.q, self.scale, self.zero, self.spec.block_size)
        return dense_error(w, self.q, self.scale, self.zero)


CLIP_GRID = np.linspace(1.0, 0.7, 13)  # fractions of a block's range tried by ``search_range``


def search_range(b: np.ndarray, spec: QuantSpec, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block of ``b`` [..., block] that minimize the block's squared
    rounding error, weighted by ``importance`` [block] (the mean square of the input channel each
    element multiplies: the error the layer's output sees) — over ranges shrunk from the block's
    min/max by each fraction in ``CLIP_GRID``. Clipping a few outliers buys a finer step for all
    other elements (GPTQ's ``mse`` option, AWQ's clip search, llama.cpp's k-quant range search)."""
    lo, hi = b.min(axis=-1), b.max(axis=-1)
    best_s, best_z = spec.scale_zero_point(lo, hi)
    best = np.full(lo.shape, np.inf)
    wts = np.ones(b.shape[-1]) if importance is None else np.asarray(importance, np.float64)
    for r in CLIP_GRID:
        s, z = spec.scale_zero_point(lo * r, hi * r)
        dq = (spec.quantize(b, s[..., None], z[..., None]) - z[..., None]) * s[..., None].astype(np.float64)
        err = ((dq - b) ** 2 * wts).sum(axis=-1)
        better = err < best
        best = np.where(better, err, best)
        best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return best_s.astype(np.float32), best_z.astype(np.int32)


def quantize(w: np.ndarray, spec: QuantSpec, hessian: np.ndarray | None = None, damp: float = 0.01,
             search: bool = False, importance: np.ndarray | None = None) -> QTensor:
    """``w`` on ``spec``'s grid: round to nearest, or GPTQ when the layer's input Hessian is given
    (block granularity only). ``search``: block ranges chosen by ``search_range`` instead of each
    block's min/max, weighted by ``importance`` [K] (or the Hessian's diagonal)."""
    w = np.asarray(w, dtype=np.float32)
    if hessian is not None:
        if spec.granularity != "block":
            raise ValueError("GPTQ quantizes blockwise specs only")
        return QTensor(*gptq(w, hessian, spec, damp, search), spec, "gptq")
    if spec.granularity == "block":
        b = blocks(w, spec.block_size)
        if search:
            imp = None
            if importance is not None:
                imp = np.zeros(b.shape[1] * b.shape[2])
                imp[: w.shape[0]] = importance
                imp = imp.reshape(b.shape[1], b.shape[2])
            scale, zero = search_range(b, spec, imp)
        else:
            scale, zero = spec.scale_zero_point(b.min(axis=-1), b.max(axis=-1))
        return QTensor(spec.quantize(b, scale[..., None], zero[..., None]), scale, zero, spec)
    if spec.granularity == "channel":
        reduce = tuple(i for i in range(w.ndim) if i != spec.axis % w.ndim)
        lo, hi = w.min(axis=reduce, keepdims=True), w.max(axis=reduce, keepdims=True)
    else:
        lo, hi = np.array(w.min()), np.array(w.max())
    scale, zero = spec.scale_zero_point(lo, hi)
    return QTensor(spec.quantize(w, scale, zero), scale, zero, spec)


def gptq(w: np.ndarray, xtx: np.ndarray, spec: QuantSpec, damp: float = 0.01,
         search: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al., 2022) over ``w`` [K, N] with input Hessian ``xtx`` [K, K]: one input row
    at a time, its rounding error spread over the rows not yet quantized, weighted by the inverse
    Hessian. Block scales are set from the error-updated weights when each block starts (the
    "static groups" off variant) — from their min/max, or with ``search`` by ``search_range``
    weighted by the Hessian's diagonal. Returns the block layout's ``q, scale, zero``."""
    k, n = w.shape
    bs = spec.block_size
    W = w.T.astype(np.float64).copy()  # [N, K]: rows are output channels, columns input rows of w
    H = xtx.astype(np.float64).copy()
    importance = np.diag(H).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular
    nb = -(-k // bs)
    q = np.zeros((n, nb * bs), dtype=np.int32)
    scale = np.ones((n, nb), dtype=np.float32)
    zero = np.zeros((n, nb), dtype=np.int32)
    for j0 in range(0, k, bs):
        j1 = min(j0 + bs, k)
        b = j0 // bs
        if search:
            s, z = search_range(W[:, j0:j1], spec, importance[j0:j1])
        else:
            s, z = spec.scale_zero_point(W[:, j0:j1].min(axis=1), W[:, j0:j1].max(axis=1))
        scale[:, b], zero[:, b] = s, z
        for j in range(j0, j1):
            qj = spec.quantize(W[:, j], s, z)
            dq = (qj - z) * s.astype(np.float64)
            q[:, j] = qj
            err = (W[:, j] - dq) / Hinv[j, j]
            W[:, j + 1:] -= np.outer(err, Hinv[j, j + 1:])
    if k % bs:  # padding rows quantize to the zero point
        q[:, k:] = zero[:, -1:]
    return q.reshape(n, nb, bs), scale, zero

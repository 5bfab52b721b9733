"""Calibration: run a model over sample text and summarize chosen activations, streaming.

Data comes from a text file (tokenized with the model's tokenizer), token-id arrays, or any
Python iterable of token-id sequences. Observers see one batch at a time and keep a fixed-size
summary, so memory does not grow with the number of batches and the model's full outputs are
never held:

- ``MinMax``: running min and max;
- ``Histogram``: a fixed-bin histogram of |x| (re-binned when the range grows), from which
  ``percentile`` and ``entropy`` (KL-divergence threshold search, as TensorRT does) pick a range;
- ``ChannelStats``: per-channel max |x| and sum of squares over the last axis (SmoothQuant's
  activation scales, Wanda's input-channel norms);
- ``Gram``: X^T X over the last axis (the Hessian GPTQ needs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from llmopt.core import atomic
from llmopt.core import model_io
from llmopt.errors import InputError

BUILTIN = "builtin"  # the reference model's own calibration text (training chapters of the KJV)
RANDOM = "random"  # uniform random token ids: exercises a pipeline on untrained models, says nothing about accuracy
SOURCE_DIR_KEY = "llmopt.source_dir"  # set by compile while passes run: where the tokenizer is


class MinMax:
    def __init__(self):
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x: np.ndarray) -> None:
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    def range(self, method: str = "minmax", percentile: float = 99.99) -> tuple[float, float]:
        return self.lo, self.hi


class Histogram(MinMax):
    """|x| histogram with ``bins`` bins over [0, amax]; doubles its range (merging bins) as needed."""

    def __init__(self, bins: int = 2048):
        super().__init__()
        self.bins = bins
        self.top = 0.0
        self.counts = np.zeros(bins, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        a = np.abs(x.astype(np.float32).reshape(-1))
        amax = float(a.max()) if a.size else 0.0
        if self.top == 0.0:
            self.top = amax or 1.0
        while amax > self.top:  # merge pairs of bins: the range doubles, the bin count stays
            self.counts = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([self.counts, np.zeros(self.bins // 2, dtype=np.int64)])
            self.top *= 2
        self.counts += np.histogram(a, bins=self.bins, range=(0, self.top))[0]

    def range(self, method: str = "minmax", percentile: float = 99.99) -> tuple[float, float]:
        if method == "minmax":
            return self.lo, self.hi
        edges = np.linspace(0, self.top, self.bins + 1)
        if method == "percentile":
            cdf = np.cumsum(self.counts) / max(self.counts.sum(), 1)
            t = float(edges[min(int(np.searchsorted(cdf, percentile / 100.0)) + 1, self.bins)])
        else:
            t = _entropy_threshold(self.counts, edges)
        return max(self.lo, -t), min(self.hi, t)


def _entropy_threshold(counts: np.ndarray, edges: np.ndarray, levels: int = 128) -> float:
    """The clipping threshold whose 'levels'-bin quantized distribution is closest (KL) to the histogram."""
    best, best_t = np.inf, float(edges[-1])
    total = counts.astype(np.float64)
    for i in range(levels, len(counts) + 1, max(1, len(counts) // 256)):
        ref = total[:i]
        p = ref.copy()
        p[i - 1] += total[i:].sum()  # the reference keeps the clipped outliers, in the last bin
        if p.sum() == 0:
            continue
        # the candidate: the unclipped bins quantized to `levels` bins, expanded over the non-empty ones
        chunks = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for idx in chunks:
            nz = ref[idx] > 0
            if nz.any():
                q[idx[nz]] = ref[idx].sum() / nz.sum()
        p, q = p / p.sum(), q / max(q.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_t = kl, float(edges[i])
    return best_t


class ChannelStats:
    def __init__(self):
        self.amax: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        amax, sumsq = np.abs(x).max(axis=0), (x * x).sum(axis=0)
        self.amax = amax if self.amax is None else np.maximum(self.amax, amax)
        self.sumsq = sumsq if self.sumsq is None else self.sumsq + sumsq
        self.rows += x.shape[0]

    @property
    def norm(self) -> np.ndarray:
        return np.sqrt(self.sumsq)


class Gram:
    def __init__(self):
        self.xtx: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        g = x.T @ x
        self.xtx = g if self.xtx is None else self.xtx + g
        self.rows += x.shape[0]


# --------------------------------------------------------------------------- data


def token_batches(source, model_dir: Path | None, seq_len: int = 128, samples: int = 32,
                  vocab: int | None = None) -> list[np.ndarray]:
    """``samples`` sequences of ``seq_len`` token ids from a text file or ``'builtin'`` (tokenized with
    the tokenizer beside the model), an array of ids, or an iterable of id sequences."""
    if str(source) == RANDOM:
        if vocab is None:
            raise InputError("calibration=random needs the model's vocabulary size")
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab, size=(1, seq_len)).astype(np.int64) for _ in range(samples)]
    if isinstance(source, (str, os.PathLike)):
        path = _builtin_text() if str(source) == BUILTIN else Path(source)
        if not path.is_file():
            raise InputError(f"calibration text {path} not found; give a text file, or token ids from Python")
        from llmopt.ort.perplexity import load_tokenizer, tokenize_file

        tok_dir = _tokenizer_dir(model_dir, vocab)
        if tok_dir is None:
            raise InputError("calibration text needs the model's tokenizer.json (beside the model or its Hugging Face "
                             "directory); pass token ids from Python instead")
        ids = tokenize_file(load_tokenizer(tok_dir), path)
    elif isinstance(source, np.ndarray):
        ids = source.reshape(-1)
    else:
        ids = np.concatenate([np.asarray(list(s), dtype=np.int64) for s in source]) if source is not None else None
    if ids is None or ids.size < seq_len:
        raise InputError(f"calibration data has {0 if ids is None else ids.size} tokens; need at least {seq_len}")
    if vocab is not None and (ids.max() >= vocab or ids.min() < 0):
        raise InputError(f"calibration token ids fall outside the model's vocabulary [0, {vocab})")
    n = min(samples, ids.size // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len].astype(np.int64)[None] for i in range(n)]


def model_batches(model: ir.Model, source, seq_len: int, samples: int) -> list[np.ndarray]:
    """``token_batches`` for ``model``: its vocabulary, and the tokenizer where compile found its source."""
    from llmopt.ort.verify import vocab_size
    source_dir = model.metadata_props.get(SOURCE_DIR_KEY)
    return token_batches(source, Path(source_dir) if source_dir else None, seq_len, samples, vocab_size(model))


def _tokenizer_dir(model_dir: Path | None, vocab: int | None) -> Path | None:
    if model_dir is not None and (model_dir / "tokenizer.json").is_file():
        return model_dir
    ref = _builtin_text().parent
    import json

    if vocab is not None and json.loads((ref / "config.json").read_text()).get("vocab_size") == vocab:
        return ref  # a graph of the reference model (compiled from an .onnx without its tokenizer beside it)
    return None


def _builtin_text() -> Path:
    from llmopt.frontend.exporter import reference_model_dir

    return reference_model_dir() / "calibration.txt"


def collect(model: ir.Model, values: Sequence[str], batches: Iterable[np.ndarray],
            make_observers) -> dict[str, list]:
    """Run ``model`` (saved to a temporary directory) over ``batches`` and feed every requested
    intermediate value to its observers; ``make_observers(name)`` returns a list of observers."""
    from llmopt.ort import sessions
    from llmopt.ort.perplexity import prefill_feeds

    observers = {name: make_observers(name) for name in values}
    by_name = {v.name: v for node in model.graph for v in node.outputs}
    by_name.update({v.name: v for v in model.graph.inputs})
    missing = [n for n in values if n not in by_name]
    if missing:
        raise ValueError(f"no values named {missing} to calibrate")
    saved = list(model.graph.outputs)
    with atomic.temp_dir("calib") as tmp:
        try:  # expose the values as graph outputs just long enough to save the model
            for n in values:
                if by_name[n] not in saved and not by_name[n].is_graph_input():
                    model.graph.outputs.append(by_name[n])
            path = model_io.save(model, tmp / model_io.MODEL_FILE)
        finally:
            model.graph.outputs.clear()
            model.graph.outputs.extend(saved)
        session = sessions.make_session(path)
        inputs = {i.name: i for i in session.get_inputs()}
        for ids in batches:
            outs = session.run(list(values), prefill_feeds(inputs, ids))
            for name, x in zip(values, outs):
                for obs in observers[name]:
                    obs.update(x)
    return observers


def observe(model: ir.Model, values: Sequence[str], options, make_observer) -> tuple[dict[str, Any], int]:
    """What a calibrating pass does: run ``model`` over the text its ``options`` name
    (``calibration``, ``seq_len``, ``samples``) and observe ``values``, one ``make_observer()`` each.
    Returns ``({value: observer}, sequences run)``."""
    batches = model_batches(model, options.calibration, options.seq_len, options.samples)
    observed = collect(model, values, batches, lambda _: [make_observer()])
    return {name: obs[0] for name, obs in observed.items()}, len(batches)

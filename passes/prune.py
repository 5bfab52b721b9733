"""`prune`: zero the weights whose removal costs least (unstructured or N:M).

Candidates are the constant 2-D weights ``W[K, N]`` of plain MatMuls (``y = x @ W``: K input
channels, N outputs; ``llmopt.quant.sites.linear_site(plain=True)``) — never embeddings or norms.
Scores:

- ``method=magnitude``: ``|W|``;
- ``method=wanda`` (Sun et al., 2023): ``|W_kn| · ‖X_k‖₂``, the input channel's activation norm
  over calibration text (streaming, one K-vector per distinct MatMul input).

Patterns:

- ``unstructured``: the lowest-scoring ``sparsity`` fraction is zeroed, per tensor
  (``scope=layer``; for wanda per output column, as the paper compares) or over all candidate
  tensors at once (``scope=global``; the global threshold is found by streaming the tensors one at
  a time, ``kth_smallest``, never every score in memory);
- ``N:M`` (``2:4``, ``4:8``): in every group of M consecutive input channels of each output column,
  exactly N weights stay — the layout sparse tensor cores accelerate. M must divide K.

Weights stay dense with zeros (zeros survive later quantization: zero is exactly representable).
``exclude`` and ``overrides`` take name patterns; ``sparsity`` counters and the model's
``llmopt.sparsity`` metadata record the zeros. Removing whole parts, so that the model is smaller,
is ``prune-ffn`` (gated-MLP channels) and ``prune-heads`` (KV heads with their query groups).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json

import numpy as np
import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass
from llmopt.errors import LlmoptError, PipelineError
from llmopt.quant.sites import LinearSite, linear_sites

SPARSITY_KEY = "llmopt.sparsity"  # per-tensor sparsity, JSON in the model's metadata


class PruneError(LlmoptError):
    """Pruning cannot be done as asked on this model."""


def activation_norms(model: ir.Model, names: list[str], options) -> dict[str, np.ndarray]:
    """Each value's per-channel L2 norm over the calibration text ``options`` name (wanda)."""
    from llmopt.ort import calibration

    observed, _ = calibration.observe(model, names, options, calibration.ChannelStats)
    return {n: o.norm for n, o in observed.items()}


@dataclasses.dataclass(frozen=True)
class ScoredOptions:
    """What every prune pass takes: how weights are scored, and what to leave alone."""

    method: str = option("magnitude", "magnitude (|W|) or wanda (|W| · input activation norm, needs calibration)")
    calibration: str = option("builtin", "wanda: a text file, 'builtin' (KJV training chapters) or 'random'")
    samples: int = option(16, "wanda: calibration sequences")
    seq_len: int = option(128, "wanda: tokens per calibration sequence")
    exclude: tuple[str, ...] = option((), "node or weight name patterns to leave alone (fnmatch, ';'-separated)")

    def __post_init__(self):
        if self.method not in ("magnitude", "wanda"):
            raise PipelineError(f"prune: method must be magnitude or wanda, got {self.method!r}")


@dataclasses.dataclass(frozen=True)
class PruneOptions(ScoredOptions):
    sparsity: float = option(0.5, "fraction of each tensor's weights to zero, in [0, 1) (unstructured)")
    scope: str = option("layer", "layer: per tensor | global: one threshold over all tensors")
    pattern: str = option("unstructured", "unstructured | N:M, e.g. 2:4 or 4:8 (N of every M input channels kept)")
    min_elements: int = option(4096, "leave weights with fewer elements alone")
    overrides: tuple[str, ...] = option((), "per-layer sparsity, PATTERN:SPARSITY (fnmatch on node or weight name), ';'-separated")
    structured: str = option("none", "moved: use the prune-ffn or prune-heads pass")

    def __post_init__(self):
        super().__post_init__()
        if self.structured != "none":
            name = {"ffn-channels": "prune-ffn", "heads": "prune-heads"}.get(self.structured, "prune-ffn or prune-heads")
            raise PipelineError(f"prune: structured={self.structured} is its own pass now: use {name}{{ratio=...}}")
        if not 0 <= self.sparsity < 1:
            raise PipelineError(f"prune: sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in ("layer", "global"):
            raise PipelineError(f"prune: scope must be layer or global, got {self.scope!r}")
        if self.pattern != "unstructured":
            self.nm  # validates
        self.override_map  # validates

    @property
    def override_map(self) -> list[tuple[str, float]]:
        out = []
        for item in self.overrides:
            pat, sep, value = item.rpartition(":")
            try:
                v = float(value)
            except ValueError:
                sep = ""
            if not sep or not pat:
                raise PipelineError(f"prune: override {item!r} is not PATTERN:SPARSITY (e.g. *layers.0.*:0.2)")
            if not 0 <= v < 1:
                raise PipelineError(f"prune: override {item!r}: sparsity must be in [0, 1)")
            out.append((pat, v))
        return out

    @property
    def nm(self) -> tuple[int, int]:
        try:
            n, m = (int(v) for v in self.pattern.split(":"))
        except ValueError:
            raise PipelineError(f"prune: pattern must be unstructured or N:M (e.g. 2:4), got {self.pattern!r}") from None
        if not 0 < n < m:
            raise PipelineError(f"prune: pattern {self.pattern} needs 0 < N < M")
        return n, m


@register_pass
class Prune(Pass):
    name = "prune"
    summary = "Magnitude / Wanda pruning: zero weights, unstructured or N:M."
    Options = PruneOptions

    def run(self, model: ir.Model) -> bool:
        o = self.options
        sites = [(s.node, s.weight) for s in self._sites(model)]
        if not sites:
            return False
        norms = activation_norms(model, sorted({n.inputs[0].name for n, _ in sites}), o) if o.method == "wanda" else {}
        if o.pattern != "unstructured":
            n_keep, m = o.nm
            bad = [w.name for _, w in sites if w.const_value.shape[0] % m]
            if bad:
                raise PruneError(f"prune: pattern {o.pattern}: M={m} does not divide the input dimension of {', '.join(bad[:3])}"
                                 f"{' ...' if len(bad) > 3 else ''}; exclude them or choose another M")
        threshold = None
        if o.pattern == "unstructured" and o.scope == "global":
            threshold = self._global_threshold(sites, norms)
        report = json.loads(model.metadata_props.get(SPARSITY_KEY, "{}"))
        for node, w in sites:
            arr = w.const_value.numpy().astype(np.float32)
            score = np.abs(arr)
            if o.method == "wanda":
                score = score * norms[node.inputs[0].name][:, None]
            sparsity = next((v for pat, v in o.override_map if fnmatch.fnmatchcase(node.name or "", pat)
                             or fnmatch.fnmatchcase(w.name or "", pat)), None)
            if sparsity is not None and o.pattern == "unstructured":
                self.count("overridden")
                mask = self._mask(score, None, sparsity)
            else:
                mask = self._mask(score, threshold)
            pruned = np.where(mask, arr, 0).astype(w.const_value.numpy().dtype)
            new = graph_util.add_initializer(model.graph, f"{w.name}_pruned", pruned)
            node.replace_input_with(1, new)
            report[new.name] = round(float(1 - mask.mean()), 6)
            self.count("tensors")
            self.count("zeros", int((~mask).sum()))
        graph_util.drop_unused_initializers(model.graph)
        model.metadata_props[SPARSITY_KEY] = json.dumps(report, sort_keys=True)
        return True

    # ------------------------------------------------------------------ helpers
    def _sites(self, model: ir.Model) -> list[LinearSite]:
        return linear_sites(model.graph, self.options.min_elements, self.options.exclude, plain=True, fold_bias=False)

    def _global_threshold(self, sites, norms) -> float:
        """The score below which ``sparsity`` of all weights fall: found by streaming, one tensor at
        a time (``kth_smallest``), never every score in memory at once."""
        def scores():
            for node, w in sites:
                s = np.abs(w.const_value.numpy().astype(np.float32))
                if self.options.method == "wanda":
                    s = s * norms[node.inputs[0].name][:, None]
                yield s.reshape(-1)

        total = sum(w.const_value.size for _, w in sites)
        k = int(round(self.options.sparsity * total))
        return kth_smallest(scores, k) if k else -np.inf

    def _mask(self, score: np.ndarray, threshold: float | None, sparsity: float | None = None) -> np.ndarray:
        """True where a weight stays."""
        o = self.options
        sparsity = o.sparsity if sparsity is None else sparsity
        k, n = score.shape
        if o.pattern != "unstructured":
            n_keep, m = o.nm
            groups = score.T.reshape(n, k // m, m)  # per output column, groups of m input channels
            order = np.argsort(groups, axis=-1)
            keep = np.zeros_like(groups, dtype=bool)
            np.put_along_axis(keep, order[..., m - n_keep:], True, axis=-1)
            return keep.reshape(n, k).T
        if threshold is not None:
            return score >= threshold if threshold > -np.inf else np.ones_like(score, dtype=bool)
        drop = int(round(sparsity * (k if o.method == "wanda" else k * n)))
        if drop == 0:
            return np.ones_like(score, dtype=bool)
        if o.method == "wanda":  # per output column
            order = np.argsort(score, axis=0)
            keep = np.ones_like(score, dtype=bool)
            np.put_along_axis(keep, order[:drop], False, axis=0)
            return keep
        flat = score.reshape(-1)
        keep = np.ones(flat.size, dtype=bool)
        keep[np.argpartition(flat, drop - 1)[:drop]] = False
        return keep.reshape(score.shape)


def kth_smallest(arrays, k: int, bins: int = 4096, limit: int = 1 << 22) -> float:
    """The ``k``-th smallest value (0-based) of all the values ``arrays()`` yields, as
    ``np.partition(np.concatenate(list(arrays())), k)[k]`` would give, holding one array at a time:
    a histogram over the range narrows it to the bin holding the answer, pass after pass, until that
    bin's values are few (``limit``) or all equal. ``arrays`` is called once per pass."""
    lo, hi, below = -np.inf, np.inf, 0  # the answer lies in [lo, hi); ``below`` values are smaller
    while True:
        count, vmin, vmax, kept = 0, np.inf, -np.inf, []
        for a in arrays():
            a = np.asarray(a, np.float64)
            sel = a[(a >= lo) & (a < hi)]
            if sel.size:
                count, vmin, vmax = count + sel.size, min(vmin, sel.min()), max(vmax, sel.max())
                if count <= limit:
                    kept.append(sel)
        if not 0 <= k - below < count:
            raise ValueError(f"k={k} is outside the {below + count} values")
        if vmin == vmax:
            return float(vmin)
        if count <= limit:
            return float(np.partition(np.concatenate(kept), k - below)[k - below])
        edges = np.linspace(vmin, np.nextafter(vmax, np.inf), bins + 1)
        counts = np.zeros(bins, np.int64)
        for a in arrays():
            a = np.asarray(a, np.float64)
            sel = a[(a >= lo) & (a < hi)]
            counts += np.bincount(np.searchsorted(edges, sel, side="right") - 1, minlength=bins)[:bins]
        cum = np.cumsum(counts)
        j = int(np.searchsorted(cum, k - below, side="right"))
        below += int(cum[j - 1]) if j else 0
        lo, hi = edges[j], edges[j + 1]

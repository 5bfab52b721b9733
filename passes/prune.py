"""`prune`: zero the weights whose removal costs least, or remove whole FFN channels.

Candidates are the constant 2-D weights ``W[K, N]`` of MatMuls (``y = x @ W``: K input channels,
N outputs) — never embeddings or norms. Scores:

- ``method=magnitude``: ``|W|``;
- ``method=wanda`` (Sun et al., 2023): ``|W_kn| · ‖X_k‖₂``, the input channel's activation norm
  over calibration text (streaming, one K-vector per distinct MatMul input).

Patterns:

- ``unstructured``: the lowest-scoring ``sparsity`` fraction is zeroed, per tensor
  (``scope=layer``; for wanda per output column, as the paper compares) or over all candidate
  tensors at once (``scope=global``, magnitude; the global threshold is found by streaming the
  tensors one at a time, ``kth_smallest``, never every score in memory);
- ``N:M`` (``2:4``, ``4:8``): in every group of M consecutive input channels of each output column,
  exactly N weights stay — the layout sparse tensor cores accelerate. M must divide K;
- ``structured=ffn-channels`` with ``ratio``: whole intermediate channels of gated MLPs
  (``down(act(gate(x)) · up(x))``) are removed by slicing ``gate``/``up`` columns and ``down``
  rows, so the model is genuinely smaller. Channel score: magnitude ``‖gate_j‖·‖up_j‖·‖down_j‖``,
  wanda ``‖down_j‖ · ‖h_j‖₂`` with ``h`` the MLP's hidden activation.

Unstructured and N:M weights stay dense with zeros (zeros survive later quantization: zero is
exactly representable). ``exclude`` takes name patterns (structured too: an MLP is left whole when
any of its three MatMuls or weights matches; heads refuse a partial exclude, since every layer keeps
one head count); ``sparsity`` counters record the zeros.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json

import numpy as np
import onnx_ir as ir

from llmopt.errors import LlmoptError
from llmopt.core import graph_util
from llmopt.core.pass_base import Pass, option
from llmopt.core.registry import register_pass

SPARSITY_KEY = "llmopt.sparsity"  # per-tensor sparsity, JSON in the model's metadata


class PruneError(LlmoptError):
    """Pruning cannot be done as asked on this model."""


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    method: str = option("magnitude", "magnitude (|W|) or wanda (|W| · input activation norm, needs calibration)")
    sparsity: float = option(0.5, "fraction of each tensor's weights to zero, in [0, 1) (unstructured)")
    scope: str = option("layer", "layer: per tensor | global: one threshold over all tensors (magnitude)")
    pattern: str = option("unstructured", "unstructured | N:M, e.g. 2:4 or 4:8 (N of every M input channels kept)")
    structured: str = option("none", "none | ffn-channels (remove whole MLP channels) | heads (remove KV heads with their query groups)")
    ratio: float = option(0.25, "structured: fraction of channels removed")
    calibration: str = option("builtin", "wanda: a text file, 'builtin' (KJV training chapters) or 'random'")
    samples: int = option(16, "wanda: calibration sequences")
    seq_len: int = option(128, "wanda: tokens per calibration sequence")
    min_elements: int = option(4096, "leave weights with fewer elements alone")
    exclude: tuple[str, ...] = option((), "node or weight name patterns to leave dense (fnmatch, ';'-separated)")
    overrides: tuple[str, ...] = option((), "per-layer sparsity, PATTERN:SPARSITY (fnmatch on node or weight name), ';'-separated")

    def __post_init__(self):
        from llmopt.errors import PipelineError

        if not 0 <= self.sparsity < 1:
            raise PipelineError(f"prune: sparsity must be in [0, 1), got {self.sparsity}")
        if not 0 <= self.ratio < 1:
            raise PipelineError(f"prune: ratio must be in [0, 1), got {self.ratio}")
        if self.method not in ("magnitude", "wanda"):
            raise PipelineError(f"prune: method must be magnitude or wanda, got {self.method!r}")
        if self.scope not in ("layer", "global"):
            raise PipelineError(f"prune: scope must be layer or global, got {self.scope!r}")
        if self.structured not in ("none", "ffn-channels", "heads"):
            raise PipelineError(f"prune: structured must be none, ffn-channels or heads, got {self.structured!r}")
        if self.pattern != "unstructured":
            self.nm  # validates
        self.override_map  # validates

    @property
    def override_map(self) -> list[tuple[str, float]]:
        from llmopt.errors import PipelineError

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
        from llmopt.errors import PipelineError

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
    summary = "Magnitude / Wanda pruning: unstructured, N:M, or whole FFN channels."
    Options = PruneOptions

    def run(self, model: ir.Model) -> bool:
        o = self.options
        if o.structured == "heads":
            return self._heads(model)
        if o.structured == "ffn-channels":
            return self._ffn_channels(model)
        sites = self._candidates(model)
        if not sites:
            return False
        norms = self._activation_norms(model, sorted({n.inputs[0].name for n, _ in sites})) if o.method == "wanda" else {}
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
    def _excluded(self, *names) -> bool:
        return any(n and fnmatch.fnmatchcase(n, p) for n in names for p in self.options.exclude)

    def _candidates(self, model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
        out = []
        for node in model.graph:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            w = node.inputs[1]
            if w is None or w.const_value is None or len(w.const_value.shape) != 2 or len(w.uses()) != 1:
                continue
            if w.const_value.size < self.options.min_elements or self._excluded(node.name, w.name):
                continue
            out.append((node, w))
        return out

    def _activation_norms(self, model: ir.Model, names: list[str]) -> dict[str, np.ndarray]:
        from llmopt.ort import calibration

        batches = calibration.model_batches(model, self.options.calibration, self.options.seq_len, self.options.samples)
        obs = calibration.collect(model, names, batches, lambda _: [calibration.ChannelStats()])
        return {n: o[0].norm for n, o in obs.items()}

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

    # ------------------------------------------------------------------ structured
    def _ffn_channels(self, model: ir.Model) -> bool:
        mlps = _gated_mlps(model)
        if not mlps:
            raise PruneError("prune{structured=ffn-channels}: no gated MLP (down(act(gate(x)) * up(x)) with constant "
                             "weights) found; run 'fuse' first, or the architecture's FFN is not supported")
        kept = [m for m in mlps if not self._excluded(*(n for k in ("gate", "up", "down")
                                                          for n in (m[k].name, m[k].inputs[1].name)))]
        self.count("excluded", len(mlps) - len(kept))
        mlps = kept
        if not mlps:
            return False
        hidden_norms = {}
        if self.options.method == "wanda":
            hidden_norms = self._activation_norms(model, [m["down"].inputs[0].name for m in mlps])
        for m in mlps:
            g, u, d = (m[k].inputs[1].const_value.numpy().astype(np.float32) for k in ("gate", "up", "down"))
            width = g.shape[1]
            if self.options.method == "wanda":
                score = hidden_norms[m["down"].inputs[0].name] * np.linalg.norm(d, axis=1)
            else:
                score = np.linalg.norm(g, axis=0) * np.linalg.norm(u, axis=0) * np.linalg.norm(d, axis=1)
            drop = int(round(self.options.ratio * width))
            keep = np.sort(np.argsort(score)[drop:])
            for key, arr, axis in (("gate", g, 1), ("up", u, 1), ("down", d, 0)):
                node = m[key]
                old = node.inputs[1]
                sliced = np.take(arr, keep, axis=axis).astype(old.const_value.numpy().dtype)
                node.replace_input_with(1, graph_util.add_initializer(model.graph, f"{old.name}_ffn{len(keep)}", sliced))
            for v in m["hidden_values"]:  # the shapes downstream of gate/up now end in len(keep)
                if v.shape is not None and v.shape[-1] == width:
                    v.shape = ir.Shape([*list(v.shape)[:-1], len(keep)])
            self.count("mlps")
            self.count("channels_removed", width - len(keep))
        graph_util.drop_unused_initializers(model.graph)
        return True


    def _heads(self, model: ir.Model) -> bool:
        """Remove ``ratio`` of the KV heads of every GroupQueryAttention, with the query heads that share
        them: columns of the packed QKV projection (and bias), rows of the output projection, the
        kernel's head counts, and the KV-cache I/O shapes."""
        sites = [s for s in map(_attention_site, model.graph) if s is not None]
        if not sites:
            raise PruneError("prune{structured=heads}: no GroupQueryAttention with a packed QKV projection and a constant "
                             "output projection found; run 'fuse' (with pack_qkv) first")
        kept = [s for s in sites if not self._excluded(*(n for k in ("gqa", "qkv", "out")
                                                          for n in (s[k].name, *(v.name for v in s[k].inputs[1:2] if v))))]
        if kept and len(kept) < len(sites):
            raise PruneError(f"prune{{structured=heads}}: exclude matches {len(sites) - len(kept)} of {len(sites)} attention "
                             "layers; every layer keeps one head count (the KV cache has one layout), so exclude all "
                             "of them or none")
        self.count("excluded", len(sites) - len(kept))
        sites = kept
        if not sites:
            return False
        outs = [s["gqa"].outputs[0].name for s in sites]
        act = self._activation_norms(model, outs) if self.options.method == "wanda" else {}
        for site in sites:
            gqa, h, hkv, hd = site["gqa"], site["heads"], site["kv_heads"], site["head_dim"]
            group = h // hkv
            wqkv, wo = site["qkv"].inputs[1].const_value.numpy(), site["out"].inputs[1].const_value.numpy()
            wo_rows = np.linalg.norm(wo.astype(np.float32).reshape(h, hd, -1), axis=(1, 2))  # per query head
            if self.options.method == "wanda":
                per_head = act[gqa.outputs[0].name].reshape(h, hd)
                head_score = np.linalg.norm(per_head, axis=1) * wo_rows
            else:
                q_cols = np.linalg.norm(wqkv[:, : h * hd].astype(np.float32).reshape(-1, h, hd), axis=(0, 2))
                head_score = q_cols * wo_rows
            kv_score = head_score.reshape(hkv, group).sum(axis=1)
            drop = int(round(self.options.ratio * hkv))
            if drop >= hkv:
                drop = hkv - 1
            keep_kv = np.sort(np.argsort(kv_score)[drop:])
            keep_q = np.concatenate([np.arange(k * group, (k + 1) * group) for k in keep_kv])
            cols = np.concatenate([
                (keep_q[:, None] * hd + np.arange(hd)).reshape(-1),
                h * hd + (keep_kv[:, None] * hd + np.arange(hd)).reshape(-1),
                (h + hkv) * hd + (keep_kv[:, None] * hd + np.arange(hd)).reshape(-1),
            ])
            rows = (keep_q[:, None] * hd + np.arange(hd)).reshape(-1)
            self._replace(model, site["qkv"], 1, np.take(wqkv, cols, axis=1), "heads")
            if site["bias_add"] is not None:
                add, slot = site["bias_add"]
                self._replace(model, add, slot, np.take(add.inputs[slot].const_value.numpy(), cols, axis=0), "heads")
            self._replace(model, site["out"], 1, np.take(wo, rows, axis=0), "heads")
            gqa.attributes["num_heads"] = ir.AttrInt64("num_heads", len(keep_q))
            gqa.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", len(keep_kv))
            for v in (site["qkv"].outputs[0], *( [site["bias_add"][0].outputs[0]] if site["bias_add"] else [])):
                if v.shape is not None:
                    v.shape = ir.Shape([*list(v.shape)[:-1], len(cols)])
            if gqa.outputs[0].shape is not None:
                gqa.outputs[0].shape = ir.Shape([*list(gqa.outputs[0].shape)[:-1], len(rows)])
            for slot in (3, 4):  # the KV cache of this layer, if the graph has one
                past = gqa.inputs[slot] if len(gqa.inputs) > slot else None
                present = gqa.outputs[slot - 2] if len(gqa.outputs) > slot - 2 else None
                for v in (past, present):
                    if v is not None and v.shape is not None and len(v.shape) == 4:
                        v.shape = ir.Shape([v.shape[0], len(keep_kv), v.shape[2], v.shape[3]])
            self.count("attention_layers")
            self.count("kv_heads_removed", hkv - len(keep_kv))
            self.count("query_heads_removed", h - len(keep_q))
        graph_util.drop_unused_initializers(model.graph)
        if "llmopt.kv_cache" in model.metadata_props:
            layout = json.loads(model.metadata_props["llmopt.kv_cache"])
            layout["kv_heads"] = len(keep_kv)
            model.metadata_props["llmopt.kv_cache"] = json.dumps(layout, sort_keys=True)
        return True

    def _replace(self, model: ir.Model, node: ir.Node, slot: int, array: np.ndarray, tag: str) -> None:
        old = node.inputs[slot]
        name = f"{old.name}_{tag}{array.shape[-1] if array.ndim == 1 else array.shape[0]}x"
        node.replace_input_with(slot, graph_util.add_initializer(model.graph, name, array))


def _attention_site(node: ir.Node) -> dict | None:
    """A GroupQueryAttention fed a packed QKV ``MatMul(x, W) [+ b]`` whose output feeds ``MatMul(., Wo)``."""
    if node.op_type != "GroupQueryAttention" or node.inputs[1] is not None or node.inputs[0] is None:
        return None
    packed, bias_add = node.inputs[0], None
    prod = packed.producer()
    if prod is not None and prod.op_type == "Add":
        slot = next((i for i, v in enumerate(prod.inputs) if v is not None and v.const_value is not None), None)
        if slot is None:
            return None
        bias_add, prod = (prod, slot), prod.inputs[1 - slot].producer()
    if prod is None or prod.op_type != "MatMul" or prod.inputs[1].const_value is None or len(prod.inputs[1].uses()) != 1:
        return None
    users = [u for u, _ in node.outputs[0].uses()]
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[1].const_value is None:
        return None
    h, hkv = node.attributes["num_heads"].as_int(), node.attributes["kv_num_heads"].as_int()
    width = prod.inputs[1].const_value.shape[1]
    if width % (h + 2 * hkv) or h % hkv:
        return None
    return {"gqa": node, "qkv": prod, "bias_add": bias_add, "out": users[0], "heads": h, "kv_heads": hkv,
            "head_dim": width // (h + 2 * hkv)}


def _gated_mlps(model: ir.Model) -> list[dict]:
    """``down(Mul(act(gate(x)), up(x)))`` with act = x·Sigmoid(x) (SiLU), QuickGelu, Gelu or FastGelu."""
    found = []
    for down in model.graph:
        if down.op_type != "MatMul" or down.inputs[1] is None or down.inputs[1].const_value is None:
            continue
        mul = down.inputs[0].producer()
        if mul is None or mul.op_type != "Mul" or len(down.inputs[0].uses()) != 1:
            continue
        for a_idx in (0, 1):
            act_out, up_out = mul.inputs[a_idx], mul.inputs[1 - a_idx]
            up = up_out.producer()
            act = act_out.producer()
            if up is None or act is None or up.op_type != "MatMul" or up.inputs[1].const_value is None:
                continue
            if act.op_type in ("QuickGelu", "Gelu", "FastGelu") and len(act.inputs) == 1:
                gate_out, extra = act.inputs[0], [act_out]
            elif act.op_type == "Mul":  # SiLU: g * Sigmoid(g)
                sig = next((i.producer() for i in act.inputs if i.producer() is not None and i.producer().op_type == "Sigmoid"), None)
                if sig is None:
                    continue
                gate_out, extra = sig.inputs[0], [act_out, sig.outputs[0]]
                if gate_out not in act.inputs:
                    continue
            else:
                continue
            gate = gate_out.producer()
            if gate is None or gate.op_type != "MatMul" or gate.inputs[1].const_value is None or gate.inputs[0] is not up.inputs[0]:
                continue
            if any(len(n.inputs[1].uses()) != 1 for n in (gate, up, down)):
                continue
            found.append({"gate": gate, "up": up, "down": down,
                          "hidden_values": [gate_out, up_out, down.inputs[0], *extra]})
            break
    return found


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

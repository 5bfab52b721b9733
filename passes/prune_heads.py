"""`prune-heads`: remove ``ratio`` of the KV heads of every GroupQueryAttention, with the query heads
that share them, so the model and its KV cache are smaller.

It slices the columns of the packed QKV projection (and bias), the rows of the output projection,
sets the kernel's head counts and the KV-cache I/O shapes. Head score: magnitude
``‖Wq columns‖·‖Wo rows‖`` per query head, wanda ``‖attention output_h‖₂ · ‖Wo rows‖``, summed
over each KV head's query group. Every layer keeps one head count (the KV cache has one layout),
so ``exclude`` matches all attention layers or none.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from llmopt.core import graph_util
from llmopt.core.pass_base import Pass, PreconditionError
from llmopt.core.registry import register_pass
from llmopt.passes.prune import PruneError, activation_norms
from llmopt.passes.prune_ffn import StructuredOptions
from llmopt.quant.sites import excluded


@register_pass
class PruneHeads(Pass):
    name = "prune-heads"
    summary = "Remove the least important KV heads with their query groups (QKV/output slices, cache shapes)."
    Options = StructuredOptions

    def requires(self, model: ir.Model) -> None:
        """Heads can only go where attention is one GroupQueryAttention fed by a packed QKV projection."""
        if not any(_attention_site(n) for n in model.graph):
            raise PreconditionError("prune-heads: no GroupQueryAttention with a packed QKV projection and a constant "
                                    "output projection found; run 'fuse' (with pack_qkv) first")

    def run(self, model: ir.Model) -> bool:
        """Remove ``ratio`` of the KV heads of every GroupQueryAttention, with the query heads that share
        them: columns of the packed QKV projection (and bias), rows of the output projection, the
        kernel's head counts, and the KV-cache I/O shapes."""
        sites = [s for s in map(_attention_site, model.graph) if s is not None]  # not empty: see requires()
        kept = [s for s in sites if not excluded(self.options.exclude, *(n for k in ("gqa", "qkv", "out")
                                                          for n in (s[k].name, *(v.name for v in s[k].inputs[1:2] if v))))]
        if kept and len(kept) < len(sites):
            raise PruneError(f"prune-heads: exclude matches {len(sites) - len(kept)} of {len(sites)} attention "
                             "layers; every layer keeps one head count (the KV cache has one layout), so exclude all "
                             "of them or none")
        self.count("excluded", len(sites) - len(kept))
        sites = kept
        if not sites:
            return False
        outs = [s["gqa"].outputs[0].name for s in sites]
        act = activation_norms(model, outs, self.options) if self.options.method == "wanda" else {}
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

"""What a decoder artifact carries besides the graph: its tokenizer, generation settings, and a
``genai_config.json`` so that onnxruntime-genai can load and run the artifact unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx_ir as ir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENAI_CONFIG = "genai_config.json"


def hf_config(hf_dir: Path | None) -> dict[str, Any]:
    if hf_dir is None or not (hf_dir / "config.json").is_file():
        return {}
    cfg = json.loads((hf_dir / "config.json").read_text())
    gen = hf_dir / "generation_config.json"
    if gen.is_file():
        cfg = {**cfg, **{k: v for k, v in json.loads(gen.read_text()).items() if k.endswith("token_id")}}
    return cfg


def copy_tokenizer(src_dirs: list[Path | None], dst: Path) -> list[str]:
    """Copy the tokenizer files found in the first directory that has a tokenizer.json."""
    for d in src_dirs:
        if d is not None and (d / "tokenizer.json").is_file():
            copied = []
            for name in TOKENIZER_FILES:
                if (d / name).is_file():
                    shutil.copyfile(d / name, dst / name)
                    copied.append(name)
            return copied
    return []


def _first(v):
    return v[0] if isinstance(v, list) and v else v


def generation_info(model: ir.Model, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """EOS/BOS/pad ids and lengths for the runtime (None for graphs without a KV cache)."""
    layout = json.loads(model.metadata_props.get("llmopt.kv_cache", "{}"))
    past = [v for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    if not past:
        return None
    return {
        "eos_token_id": _first(cfg.get("eos_token_id")),
        "bos_token_id": _first(cfg.get("bos_token_id")),
        "pad_token_id": _first(cfg.get("pad_token_id")),
        "context_length": layout.get("max_length") if layout.get("buffer") == "shared" else cfg.get("max_position_embeddings", cfg.get("n_positions", layout.get("max_length", 4096))),
        "kv_buffer": layout.get("buffer", "concat"),
    }


def genai_config(model: ir.Model, cfg: dict[str, Any], provider: str, filename: str = "model.onnx") -> dict[str, Any] | None:
    """onnxruntime-genai's config for a decoder with ``past_key_values.N.key/value`` I/O."""
    inputs = {v.name: v for v in model.graph.inputs}
    past = sorted(n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    if not past or "input_ids" not in inputs or "logits" not in {v.name for v in model.graph.outputs}:
        return None
    shape = inputs[past[0]].shape
    kv_heads, head_size = int(shape[1]), int(shape[3])
    heads = int(cfg.get("num_attention_heads", cfg.get("n_head", kv_heads)))
    hidden = int(cfg.get("hidden_size", cfg.get("n_embd", heads * head_size)))
    gen = generation_info(model, cfg) or {}
    names = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    for optional in ("attention_mask", "position_ids"):
        if optional in inputs:
            names[optional] = optional
    providers = [] if provider == "CPUExecutionProvider" else [{provider.removesuffix("ExecutionProvider").lower(): {}}]
    context = int(gen.get("context_length") or 4096)
    config = {
        "model": {
            "bos_token_id": gen.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": filename,
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": names,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": len(past),
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": gen.get("eos_token_id"),
            "pad_token_id": gen.get("pad_token_id") if gen.get("pad_token_id") is not None else gen.get("eos_token_id"),
            "type": "decoder",  # genai's generic decoder: llmopt's I/O is the same for every architecture (its "gpt2" type expects other inputs)
            "vocab_size": _vocab(model, cfg),
        },
        "search": {
            "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": gen.get("kv_buffer") == "shared",
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # onnxruntime-genai refuses null, accepts absent
        if config["model"][key] is None:
            del config["model"][key]
    return config


def _vocab(model: ir.Model, cfg: dict[str, Any]) -> int | None:
    from llmopt.ort.verify import vocab_size
    try:
        return vocab_size(model)
    except Exception:  # noqa: BLE001 - a graph without logits/embedding: fall back to the config
        return cfg.get("vocab_size")

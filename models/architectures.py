"""Hugging Face configs for every architecture llmopt is tested on.

``tiny`` configs keep the test suite fast; ``50m`` is the ~50M-parameter Llama
used by the benchmarks (weights larger than the L3 cache). Weights are random
(seeded); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3", "gpt2", "gemma")

# Beyond the six the suite tests everywhere: the decoder-only architectures of the coverage sweep
# (benchmarks/coverage.py, docs/coverage.md), as what their tiny config changes from ``_TINY``
# (a value of None drops the key). Values a real checkpoint has where the default would hide a
# variant: Granite's scalar multipliers (its defaults are all 1.0).
EXTRA: dict[str, dict] = {
    "granite": dict(embedding_multiplier=12.0, attention_multiplier=0.0078125, residual_multiplier=0.22,
                    logits_scaling=8.0),
    "qwen3": {}, "gemma2": dict(head_dim=16), "gemma3_text": dict(head_dim=16), "olmo": {},
    "olmo2": {}, "falcon": {}, "bloom": {}, "opt": {}, "starcoder2": {}, "cohere": {}, "glm": {}, "helium": {},
    "smollm3": {}, "nemotron": {}, "gpt_bigcode": {}, "olmo3": {},
    # partial rotary: heads wide enough that the rotary part is a multiple of 16 wide, as in the real
    # checkpoints (ORT's kernels want the cos/sin cache a multiple of 8 wide)
    "phi": dict(hidden_size=128, intermediate_size=256),  # head 32, rotary 0.5 -> 16
    "stablelm": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256),  # 64, 0.25
    "persimmon": dict(hidden_size=128, intermediate_size=256),  # head 32, rotary 0.5 -> 16
    "gpt_neox": dict(hidden_size=128, num_attention_heads=2, intermediate_size=256),  # head 64, rotary 0.25
    "gptj": dict(hidden_size=128, num_attention_heads=2, rotary_dim=32),  # head 64
    "codegen": dict(hidden_size=128, num_attention_heads=2, rotary_dim=32),  # head 64
}

# Mixture-of-experts decoders (issue 15): 4 experts, 2 per token, as what their tiny config changes
# from ``_TINY``. Exported with transformers' ``batched_mm`` experts (llmopt.frontend.exporter).
MOE: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    layer_types=["sliding_attention", "full_attention"]),
}

_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


LLAMA_SIZES = {
    # 8 layers × 3.15M + 2 × 12.6M (embeddings, lm_head) ≈ 50.3M parameters (~201 MB fp32)
    "50m": dict(vocab_size=24576, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4),
    # 20 layers × 11.65M + 2 × 32.8M ≈ 298M parameters (~1.19 GB fp32): weights far beyond a CPU's
    # last-level cache, so a decode step streams them from memory, as serving does
    "300m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                 num_attention_heads=16, num_key_value_heads=8),
    # TinyLlama-1.1B's shape: 22 layers × 44.0M + 2 × 65.5M ≈ 1.10B parameters (4.40 GB fp32), far
    # beyond any last-level cache seen on these machines (300 MiB at most)
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
}


MOE_SIZES = {
    # Mixtral-shaped, 8 experts top-2: 12 layers × (8 × 3 × 768 × 1536 experts + 1.57M attention) +
    # 2 × 24.6M (embeddings, lm_head) ≈ 408M parameters (1.63 GB fp32), ~153M active per token
    "400m": dict(vocab_size=32000, hidden_size=768, intermediate_size=1536, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
}


def config(arch: str, size: str = "tiny", layers: int | None = None):
    """A transformers config for ``arch`` at ``size`` ('tiny'; '50m', '300m' or '1b' for llama, '400m'
    for mixtral); ``layers`` overrides the depth of 'tiny'."""
    from transformers import AutoConfig

    known = ARCHITECTURES + tuple(EXTRA) + tuple(MOE)
    if arch not in known:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(known)}")
    if size == "tiny" and (arch in EXTRA or arch in MOE):
        changes = EXTRA[arch] if arch in EXTRA else MOE[arch]  # an EXTRA entry may be {} (no changes)
        kw = {k: v for k, v in {**_TINY, "num_hidden_layers": layers or 2, **changes}.items() if v is not None}
        return AutoConfig.for_model(arch, **kw)
    if size == "tiny":
        if arch == "gpt2":
            return AutoConfig.for_model(
                "gpt2", vocab_size=512, n_embd=64, n_layer=layers or 2, n_head=4, n_positions=256,
                bos_token_id=1, eos_token_id=2,
            )
        kw = dict(_TINY, num_hidden_layers=layers or _TINY["num_hidden_layers"])
        if arch == "gemma":
            kw["head_dim"] = 16
        return AutoConfig.for_model(arch, **kw)
    if size in MOE_SIZES:
        if arch != "mixtral":
            raise ValueError(f"the {size} size is defined for mixtral only")
        return AutoConfig.for_model("mixtral", max_position_embeddings=2048, **MOE_SIZES[size])
    if size in LLAMA_SIZES:
        if arch != "llama":
            raise ValueError(f"the {size} size is defined for llama only")
        return AutoConfig.for_model("llama", max_position_embeddings=2048, **LLAMA_SIZES[size])
    raise ValueError(f"unknown size {size!r}; 'tiny', '50m', '300m', '1b' (llama) or '400m' (mixtral)")


def build(arch: str, out: str | Path, size: str = "tiny", seed: int = 0, layers: int | None = None) -> Path:
    """Save a random-init model of ``arch`` to ``out`` (a Hugging Face model directory).

    Every tensor is random, norms and biases included: Hugging Face initializes those to 1 and 0,
    which constant folding would erase and common-subexpression elimination would merge across
    layers — graphs no trained model has.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, size, layers=layers)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.02)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    return out


def export_input_ids_only(hf_dir: str | Path, out: str | Path) -> Path:
    """The plainest export people write themselves, without llmopt: ``input_ids`` in, logits out,
    no mask, no cache — ``torch.onnx.export(model, (input_ids,), dynamo=True)``, weights external.
    An input llmopt did not make, for tests and benchmarks."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    if getattr(type(model), "_can_set_experts_implementation", lambda: False)():
        # transformers' default experts (grouped_mm) do not convert; the one setting a user must
        # change to export a mixture-of-experts model at all (docs/guide.md)
        model.set_experts_implementation("batched_mm")

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    program = torch.onnx.export(LogitsOnly().eval(), (ids,), dynamo=True, input_names=["input_ids"],
                                output_names=["logits"], dynamic_shapes=dims)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out), external_data=True)
    return out


def export_torchscript(hf_dir: str | Path, out: str | Path, attn_implementation: str | None = None) -> Path:
    """The TorchScript export (``torch.onnx.export(..., dynamo=False)``, the exporter Hugging Face
    Optimum uses): ``input_ids`` and ``attention_mask`` in, logits out, traced at batch 2, dynamic
    batch and sequence; weights external. An input llmopt did not make, for tests and benchmarks."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(hf_dir, **kwargs).eval()

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(LogitsOnly().eval(), (ids, mask), str(out), dynamo=False, opset_version=18,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=dims)
    import onnx

    proto = onnx.load(str(out))
    onnx.save(proto, str(out), save_as_external_data=True, location=out.name + ".data")
    return out

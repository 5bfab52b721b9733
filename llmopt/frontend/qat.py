"""Quantization-aware training: fine-tune a Hugging Face model through fake quantization with the
same blockwise specs the ``weight-only`` pass uses, then compile it as usual.

Every ``nn.Linear`` weight ``W[out, in]`` is replaced, in the forward pass, by its round trip
through the spec's integer grid (blocks of ``block_size`` input channels per output row, zero
points unless symmetric — the layout of ``MatMulNBits``), with the straight-through estimator
for the gradient. After a few hundred steps on text the float weights sit where rounding costs
least; ``save`` writes them as an ordinary Hugging Face directory, and compiling it with
``weight-only`` (round to nearest, the same grid) produces the quantized artifact — the same form
post-training quantization produces. Hybrid: compile the QAT weights with a target that also
calibrates activations (``qdq``), or with ``weight-only{method=gptq}``.

    from llmopt.frontend import qat
    qat.finetune("models/reference", "ref-qat", bits=4, block_size=32, steps=200)
    llmopt.compile("ref-qat", target="cpu-int4", passes="...weight-only{method=rtn}...")
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from llmopt.errors import InputError


@dataclasses.dataclass(frozen=True)
class QATSettings:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    steps: int = 200
    lr: float = 2e-5
    batch: int = 8
    seq_len: int = 128
    calibration: str = "builtin"
    seed: int = 0

    def __post_init__(self):
        from llmopt.quant.spec import QuantSpec

        QuantSpec(dtype=f"uint{self.bits}" if self.bits in (4, 8) else "bad", symmetric=self.symmetric,
                  granularity="block", block_size=self.block_size)
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise InputError("QAT needs steps >= 1, batch >= 1 and lr > 0")


def fake_quant(w, bits: int, block: int, symmetric: bool):
    """``w`` [out, in] through the blockwise integer grid of weight-only's ``QuantSpec`` (the same
    levels, zero point and clipping, in torch for autograd), straight-through gradient."""
    import torch

    from llmopt.quant.spec import QuantSpec

    spec = QuantSpec(dtype=f"uint{bits}", symmetric=symmetric, granularity="block", block_size=block)
    out_f, in_f = w.shape
    pad = (-in_f) % block
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(out_f, -1, block)
    if symmetric:
        amax = wp.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
        scale = amax / spec.levels
        zero = torch.full_like(scale, float(spec.midpoint))
        lo, hi = spec.midpoint - spec.levels, spec.midpoint + spec.levels
    else:
        lo, hi = spec.qmin, spec.qmax
        wmin = wp.amin(dim=-1, keepdim=True).clamp_max(0)
        wmax = wp.amax(dim=-1, keepdim=True).clamp_min(0)
        scale = ((wmax - wmin) / (hi - lo)).clamp_min(1e-8)
        zero = torch.round(lo - wmin / scale).clamp(lo, hi)
    q = torch.clamp(torch.round(wp / scale) + zero, lo, hi)
    deq = ((q - zero) * scale).reshape(out_f, -1)[:, :in_f]
    return w + (deq - w).detach()  # forward: quantized; backward: identity


def _wrap_linears(model, s: QATSettings) -> int:
    """Route every large ``nn.Linear`` weight through ``fake_quant`` (a torch parametrization)."""
    import torch
    from torch.nn.utils import parametrize

    class FakeQuant(torch.nn.Module):
        def forward(self, w):
            return fake_quant(w, s.bits, s.block_size, s.symmetric)

    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.numel() >= 4096:
            parametrize.register_parametrization(module, "weight", FakeQuant())
            n += 1
    return n


def finetune(model_dir: str | os.PathLike, out: str | os.PathLike, settings: QATSettings = QATSettings(),
             progress: Callable[[str], None] | None = None) -> dict:
    """Fine-tune the Hugging Face model in ``model_dir`` through fake quantization; save to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmopt.ort import calibration

    src, out = Path(model_dir), Path(out)
    if not (src / "config.json").is_file():
        raise InputError(f"{src}: not a Hugging Face model directory (no config.json)")
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config.tie_word_embeddings = getattr(model.config, "tie_word_embeddings", False)
    n_batches = settings.steps * settings.batch
    rows = calibration.token_batches(settings.calibration, src, settings.seq_len + 1, n_batches,
                                     model.config.vocab_size)
    data = np.concatenate(rows)
    wrapped = _wrap_linears(model, settings)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=0.0)
    rng = np.random.default_rng(settings.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(settings.steps):
        idx = rng.integers(0, len(data), size=settings.batch)
        batch = torch.from_numpy(data[idx])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress and (step % 20 == 0 or step == settings.steps - 1):
            progress(f"qat step {step + 1}/{settings.steps} loss {np.mean(losses[-20:]):.4f}")
    model.eval()
    for module in model.modules():  # keep the trained float weights, drop the fake-quant wrappers
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            torch.nn.utils.parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "eval.txt"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    log = {"settings": dataclasses.asdict(settings), "linears": wrapped, "first_loss": losses[0],
           "last_loss": float(np.mean(losses[-20:])), "seconds": round(time.perf_counter() - t0, 1),
           "calibration_tokens": int(data.size)}
    (out / "qat_log.json").write_text(json.dumps(log, indent=2))
    return log

"""`llmopt generate`: prompts in (text or ids), tokens and text out, with timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmopt.errors import InputError


def parse_ids(items: list[str]) -> list[list[int]]:
    out = []
    for item in items:
        try:
            ids = [int(t) for t in item.replace(" ", "").split(",") if t]
        except ValueError:
            raise InputError(f"--prompt-ids '{item}' is not comma-separated integers (e.g. --prompt-ids 1,2,3)") from None
        if not ids:
            raise InputError("--prompt-ids is empty")
        out.append(ids)
    return out


def run_generate(artifact: Path, prompts: list[str], prompt_ids: list[str], max_new_tokens: int, greedy: bool,
                 temperature: float, top_k: int, top_p: float, seed: int, threads: int | None, as_json: bool) -> dict:
    from llmopt.core import model_io
    from llmopt.ort.generation import Generator, Sampling

    if bool(prompts) == bool(prompt_ids):
        raise InputError("give either --prompt TEXT or --prompt-ids 1,2,3 (each repeatable for a batch)")
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: must be >= 1 (the intra-op threads ONNX Runtime uses)")
    model_file = model_io.resolve_model_file(artifact)
    tokenizer = None
    if prompts:
        from llmopt.ort.perplexity import load_tokenizer

        if not (model_file.parent / "tokenizer.json").is_file():
            raise InputError(f"{artifact}: the artifact has no tokenizer.json; pass token ids with --prompt-ids")
        tokenizer = load_tokenizer(model_file.parent)
        ids = [tokenizer.encode(p).ids for p in prompts]
    else:
        ids = parse_ids(prompt_ids)
    sampling = Sampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    gen = Generator(model_file, threads=threads)
    if any(max(p) >= gen.vocab_size or min(p) < 0 for p in ids):
        raise InputError(f"a prompt token id is outside the vocabulary [0, {gen.vocab_size})")
    dots = (lambda step: print(".", end="", file=sys.stderr, flush=True)) if not as_json else None
    result = gen.generate(ids, max_new_tokens, sampling, on_step=dots)
    if dots:
        print(file=sys.stderr)
    decode = result.step_seconds
    report = {
        "artifact": str(artifact),
        "prompts": ids,
        "tokens": result.tokens,
        "text": [tokenizer.decode(t) for t in result.tokens] if tokenizer else None,
        "load_seconds": round(gen.load_seconds, 4),
        "prefill_seconds": round(result.prefill_seconds, 4),
        "decode_tokens_per_second": round(len(decode) * len(ids) / sum(decode), 2) if decode else None,
        "kv_buffer": gen.layout.buffer,
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for i, toks in enumerate(result.tokens):
            shown = report["text"][i] if tokenizer else ",".join(map(str, toks))
            print(f"[{i}] {prompts[i] if prompts else ''}{shown}" if prompts else f"[{i}] {shown}")
        tps = report["decode_tokens_per_second"]
        print(f"load {report['load_seconds']:.2f}s, prefill {report['prefill_seconds'] * 1e3:.1f} ms, "
              f"decode {tps if tps is not None else '-'} tokens/s ({gen.layout.buffer} KV cache)", file=sys.stderr)
    return report

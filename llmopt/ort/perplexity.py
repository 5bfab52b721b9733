"""Perplexity of an ONNX decoder on a text, computed in ONNX Runtime."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from llmopt.ort import verify

from llmopt.ort import sessions
from llmopt.errors import InputError
from llmopt.compiler.preflight import check_text


def load_tokenizer(model_dir: str | os.PathLike):
    """The ``tokenizers`` tokenizer saved with a model (tokenizer.json)."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{Path(model_dir).resolve()}: no tokenizer.json; put the model's tokenizer.json there "
                         "(`llmopt eval` also takes --tokenizer DIR)")
    return Tokenizer.from_file(str(path))


def tokenize_file(tokenizer, text_file: str | os.PathLike, max_tokens: int | None = None) -> np.ndarray:
    p = Path(text_file)
    if not p.is_file():
        raise InputError(f"{p}: evaluation text not found; check the path given to --eval-text (compile) or --text (eval)")
    if max_tokens is not None and max_tokens < 0:
        raise InputError(f"--tokens {max_tokens}: must be >= 0 (0 means the whole text)")
    check_text(p, "--text")
    ids = tokenizer.encode(p.read_text(encoding="utf-8")).ids
    if max_tokens:
        ids = ids[:max_tokens]
    return np.asarray(ids, dtype=np.int64)


def perplexity(session, token_ids: np.ndarray, window: int = 128, batch: int = 8) -> dict[str, float]:
    """exp(mean NLL) over non-overlapping windows; each window's first token is context only."""
    inputs = {i.name: i for i in session.get_inputs()}
    if window < 2:
        raise InputError(f"--window {window}: a window needs at least 2 tokens (one of context, one predicted)")
    outputs = session.get_outputs()
    logits = verify.logits_name(o.name for o in outputs)
    shape = next(o.shape for o in outputs if o.name == logits)
    vocab = shape[-1] if shape and isinstance(shape[-1], int) else None
    if vocab is not None and len(token_ids) and int(token_ids.max()) >= vocab:
        raise InputError(f"token id {int(token_ids.max())} is outside the model's vocabulary of {vocab}: the tokenizer "
                         "is not this model's; give the model's own (`llmopt eval --tokenizer DIR`)")
    n = (len(token_ids) // window) * window
    if n == 0:
        raise InputError(f"evaluation text has {len(token_ids)} tokens; need at least {window}")
    windows = token_ids[:n].reshape(-1, window)
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        feeds = prefill_feeds(inputs, chunk)
        logits = sessions.run(session, feeds)[verify.logits_name(o.name for o in session.get_outputs())]
        logits = logits[:, :-1].astype(np.float64)
        targets = chunk[:, 1:]
        m = logits.max(-1, keepdims=True)
        logz = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))
        picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        nll += float((logz - picked).sum())
        count += targets.size
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": int(count)}


def prefill_feeds(inputs, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for running ``ids`` [batch, seq] from an empty cache; ``inputs``: the session's inputs by name."""
    b, s = ids.shape
    feeds = {"input_ids": ids.astype(np.int64)}
    if "attention_mask" in inputs:
        feeds["attention_mask"] = np.ones((b, s), dtype=np.int64)
    if "position_ids" in inputs:
        feeds["position_ids"] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
    for name, info in inputs.items():
        if name.startswith("past_key_values"):
            kv, hd = info.shape[1], info.shape[3]
            dtype = np.float16 if "float16" in info.type else np.float32
            feeds[name] = np.zeros((b, kv, 0, hd), dtype=dtype)
    return feeds

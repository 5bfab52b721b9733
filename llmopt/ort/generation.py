"""The generation loop: a decoder graph with KV-cache I/O driven step by step in ONNX Runtime.

The cache never leaves ONNX Runtime between steps: presents come back as ``OrtValue``s bound
(IOBinding) as the next step's pasts. With a shared buffer (``kv-cache{buffer=shared}``) the
caches are preallocated for ``max_length`` positions and bound as both past and present, so
GroupQueryAttention writes each step's entries in place. Batches are padded on the right; the
attention mask marks the padding and positions count valid tokens only, as Hugging Face does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from llmopt.errors import InputError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (argmax), or sampled with temperature / top-k / top-p."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0 (got {self.temperature}); use greedy decoding instead")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (got {self.top_k})")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (up to and including EOS)
    prompt_lengths: list[int]
    prefill_seconds: float
    step_seconds: list[float]  # one entry per decode step after the prefill

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype
    buffer: str = "concat"
    max_length: int = 4096

    def bytes(self, batch: int, positions: int) -> int:
        """2 (K and V) · layers · kv_heads · head_dim · positions · batch · bytes per element."""
        return 2 * self.layers * self.kv_heads * self.head_dim * positions * batch * self.dtype.itemsize


class Generator:
    """Greedy or sampled generation over a compiled artifact (directory) or an .onnx file with a KV cache."""

    def __init__(self, model: str | os.PathLike, *, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), buffer: str | None = None, naive: bool = False):
        """``naive=True`` is the loop people write first (the baseline `llmopt bench` compares with):
        numpy in and out every step, the cache copied out of ONNX Runtime and back in."""
        from llmopt.core import model_io
        from llmopt.ort import sessions

        path = model_io.resolve_model_file(model)
        self.path = path
        self.naive = naive
        self.last_cache_bytes = 0
        t0 = time.perf_counter()
        self.session = sessions.make_session(path, providers=providers, threads=threads)
        self.load_seconds = time.perf_counter() - t0
        self.device = "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        # logits-to-keep pass: the lm_head runs on the positions asked for only (default: all)
        self.keeps_logits = "logits_to_keep" in {i.name for i in self.session.get_overridable_initializers()}
        if "input_ids" not in inputs:
            raise InputError(f"{path}: no 'input_ids' input; llmopt generates with decoder graphs only")
        pasts = sorted((int(m.group(1)), m.group(2), name) for name in inputs if (m := _PAST.match(name)))
        if not pasts:
            raise InputError(f"{path}: no KV-cache inputs (past_key_values.N.key/value); compile with a cache "
                             "(export --with-past, or add the 'kv-cache' pass)")
        self.past_names = [name for _, _, name in pasts]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        shape = inputs[self.past_names[0]].shape
        meta = json.loads(self.session.get_modelmeta().custom_metadata_map.get("llmopt.kv_cache", "{}"))
        dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        self.layout = CacheLayout(layers=len(pasts) // 2, kv_heads=int(shape[1]), head_dim=int(shape[3]),
                                  dtype=np.dtype(dtype), buffer=buffer or meta.get("buffer", "concat"),
                                  max_length=int(meta.get("max_length", 4096)))
        if naive and self.layout.buffer == "shared":
            raise InputError("a naive loop copies the cache every step; it cannot use a shared buffer")
        if self.layout.buffer == "shared" and not meta.get("group_query_attention"):
            raise InputError(f"{path}: a shared KV buffer needs GroupQueryAttention in the graph (fuse it, then kv-cache{{buffer=shared}})")
        self.eos_token_id = _eos_from(Path(path).parent)
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1]) if isinstance(self.session.get_outputs()[0].shape[-1], int) else 2**31

    # ------------------------------------------------------------------ the loop
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, sampling: Sampling = Sampling(),
                 eos_token_id: int | None = None, on_step: Callable[[int], None] | None = None) -> GenerationResult:
        import onnxruntime as ort

        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        batch, lengths = len(prompts), [len(p) for p in prompts]
        width = max(lengths)
        total = width + max_new_tokens
        if self.layout.buffer == "shared" and total > self.layout.max_length:
            raise InputError(f"prompt ({width}) + new tokens ({max_new_tokens}) exceed the cache's max_length "
                             f"({self.layout.max_length}); recompile with kv-cache{{max_length=...}}")
        ids = np.zeros((batch, width), dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
            mask[b, : len(p)] = 1
        rng = np.random.default_rng(sampling.seed)
        io = self.session.io_binding()
        L = self.layout
        if L.buffer == "shared":  # as long as this generation can get (at most max_length), written in place
            caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, L.kv_heads, total, L.head_dim), L.dtype))
                      for _ in self.past_names]
        elif self.naive:
            caches = [np.zeros((batch, L.kv_heads, 0, L.head_dim), L.dtype) for _ in self.past_names]
        else:
            caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, L.kv_heads, 0, L.head_dim), L.dtype))
                      for _ in self.past_names]
        out = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        step_ids, positions, last = ids, np.broadcast_to(np.arange(width), (batch, width)).copy(), np.array(lengths) - 1
        step_seconds: list[float] = []
        prefill_seconds = 0.0
        # the prefill needs logits from the shortest prompt's last position on; a step, its one position
        keep = width - min(lengths) + 1
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            extra = ({"logits_to_keep": np.array(keep, dtype=np.int64)}
                     if self.keeps_logits and keep < step_ids.shape[1] else {})
            if self.naive or extra:
                # IOBinding cannot bind an input that has a default (logits_to_keep), so a prefill that
                # keeps fewer logits runs unbound; its caches come back as arrays, wrapped once
                feeds = {"input_ids": step_ids, "attention_mask": mask, **dict(zip(self.past_names, caches)), **extra}
                if "position_ids" in self.input_names:
                    feeds["position_ids"] = positions
                outputs = self.session.run(["logits", *self.present_names], feeds)
                logits, caches = outputs[0], outputs[1:]
                if not self.naive:
                    caches = [ort.OrtValue.ortvalue_from_numpy(c) for c in caches]
            else:
                logits, caches = self._step_bound(io, step_ids, mask, positions, caches)
            # logits hold the last logits.shape[1] positions of this step's input
            offset = step_ids.shape[1] - logits.shape[1]
            rows = logits[np.arange(batch), last - offset] if logits.shape[1] > 1 else logits[:, -1]
            nxt = _choose(rows, sampling, rng)
            elapsed = time.perf_counter() - t0
            if step == 0:
                prefill_seconds = elapsed
            else:
                step_seconds.append(elapsed)
            for b in range(batch):
                if not done[b]:
                    out[b].append(int(nxt[b]))
                    done[b] = eos is not None and int(nxt[b]) == eos
            if on_step:
                on_step(step)
            if done.all():
                break
            valid = mask.sum(axis=1)
            step_ids = nxt.reshape(batch, 1).astype(np.int64)
            positions = valid.reshape(batch, 1).astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            last = np.zeros(batch, dtype=np.int64)
            keep = 1
        self.last_cache_bytes = sum(_nbytes(c) for c in caches)
        return GenerationResult(out, lengths, prefill_seconds, step_seconds)

    def _step_bound(self, io, step_ids, mask, positions, caches):
        """One step with IOBinding: inputs from numpy, caches as OrtValues that stay in ONNX Runtime."""
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(step_ids))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name, value in zip(self.past_names, caches):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", self.device)
        shared = self.layout.buffer == "shared"
        for name, value in zip(self.present_names, caches):
            if shared:
                io.bind_ortvalue_output(name, value)
            else:
                io.bind_output(name, self.device)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        return outputs[0].numpy(), (caches if shared else list(outputs[1:]))


def _nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    return int(np.prod(value.shape())) * np.dtype(np.float16 if "float16" in value.data_type() else np.float32).itemsize


def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    if sampling.greedy:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.sort(z, axis=-1)[:, -min(sampling.top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, axis=-1)
        keep = np.cumsum(sorted_p, axis=-1) - sorted_p < sampling.top_p  # always keeps the top token
        cut = np.zeros_like(p)
        np.put_along_axis(cut, order, np.where(keep, sorted_p, 0.0), axis=-1)
        p = cut / cut.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def _eos_from(directory: Path) -> int | None:
    """The EOS token id recorded with the artifact (llmopt.json) or a Hugging Face config beside the model."""
    for name, key in (("llmopt.json", ("generation", "eos_token_id")), ("generation_config.json", ("eos_token_id",)),
                      ("config.json", ("eos_token_id",))):
        f = directory / name
        if f.is_file():
            value = json.loads(f.read_text())
            for k in key:
                value = value.get(k) if isinstance(value, dict) else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return None


def greedy_by_recompute(model: str | os.PathLike, prompt: Sequence[int], max_new_tokens: int,
                        threads: int | None = None) -> list[int]:
    """Reference decoding: run the graph over the whole sequence at every step (a graph with cache
    inputs gets them empty: no cache is used)."""
    import onnx_ir as ir

    from llmopt.core import model_io, graph_util
    from llmopt.ort import sessions

    path = model_io.resolve_model_file(model)
    pasts = {}
    for v in model_io.load(path).graph.inputs:
        if _PAST.match(v.name):
            kv_heads, head_dim = graph_util.cache_dims(v)
            pasts[v.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float16 if v.dtype == ir.DataType.FLOAT16 else np.float32)
    session = sessions.make_session(path, threads=threads)
    names = {i.name for i in session.get_inputs()}
    seq = list(prompt)
    for _ in range(max_new_tokens):
        ids = np.array([seq], dtype=np.int64)
        feeds = {"input_ids": ids, **pasts}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones_like(ids)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(len(seq), dtype=np.int64)[None]
        logits = session.run(["logits"], feeds)[0]
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]

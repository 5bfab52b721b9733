"""Export a Hugging Face causal LM to ONNX with torch.onnx (dynamo).

Interface of the exported graph:

- without cache: ``input_ids [batch, seq]``, ``attention_mask [batch, seq]`` → ``logits``
- ``with_past=True``: also ``position_ids [batch, seq]`` and
  ``past_key_values.{i}.key/value [batch, kv_heads, past_seq, head_dim]`` inputs,
  ``attention_mask [batch, past_seq + seq]``, and ``present.{i}.key/value`` outputs.

torch and transformers are optional dependencies: only this module needs them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path

from llmopt.core import atomic
from llmopt.frontend import export_cache
from llmopt.compiler import preflight
from llmopt.core import model_io
from llmopt.compiler.genai import TOKENIZER_FILES
from llmopt.errors import InputError, MissingDependencyError, OutputError, first_line

REFERENCE_NAME = "reference"


def reference_model_dir() -> Path:
    """The trained reference model shipped with llmopt (llmopt/models/reference)."""
    from llmopt import models

    return Path(models.__file__).parent / "reference"


def resolve_hf_dir(path: str | os.PathLike) -> Path | None:
    """``path`` as a Hugging Face model directory, or None if it is not one.

    The name ``reference`` means the bundled reference model unless a file of that name exists.
    """
    p = Path(path)
    if not p.exists() and str(path) == REFERENCE_NAME:
        p = reference_model_dir()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    return None


def _require_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"exporting from PyTorch needs torch and transformers ({exc.name} is missing); "
            "install them with `pip install 'llmopt[export]' torch==2.13.0`"
        ) from None


def load_hf_model(model_dir: Path):
    """Load a causal LM from a local directory (never from a hub), in fp32, eval mode."""
    _require_torch()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{model_dir}: config.json cannot be read as a transformers config ({first_line(exc)})") from None
    weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.bin"))
    if not weights:
        raise InputError(f"{model_dir}: no weights (*.safetensors or *.bin) next to config.json")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{model_dir}: transformers cannot load this model ({first_line(exc)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _traceable_experts(model)
    return model.eval()


def _traceable_experts(model) -> None:
    """Mixture-of-experts blocks computed in a form torch.onnx can trace.

    transformers' default ("eager") experts loop over the experts a batch hit, a data-dependent loop
    torch.onnx cannot convert. Its own ``batched_mm`` implementation computes the same function
    without one: each (token, chosen expert) pair gathers its expert's weights and runs one batched
    matmul, and the routing weights sum the results (transformers.integrations.moe). Models without
    experts are left as they are."""
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if can_set is not None and can_set():
        model.set_experts_implementation("batched_mm")


def _wrap(model, with_past: bool):
    import torch
    from transformers import DynamicCache

    num_layers = model.config.num_hidden_layers

    class NoCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()  # full layers: the past comes in whole and the mask applies any sliding window
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers[:num_layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return WithCache() if with_past else NoCache()


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers decoder config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if hasattr(config, "multi_query"):  # Falcon, GPTBigCode: their own switch, no num_key_value_heads; the cache
        # holds one head with multi_query, every head otherwise (Falcon's new_decoder_architecture repeats K/V first)
        multi = config.multi_query and not getattr(config, "new_decoder_architecture", False)
        kv_heads = 1 if multi else heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def export(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    with_past: bool = False,
    opset: int = 20,
    verbose: bool = False,
) -> Path:
    """Export the HF model in ``model_dir`` to ``out`` (an .onnx path; weights go to ``out + '.data'``,
    or to ``out + '.1.data'`` when that name is taken by the export being replaced); the tokenizer
    files are copied beside it.

    The file is written atomically: nothing appears at ``out`` unless the export succeeded, and an
    export that replaces another leaves the previous pair whole until the new .onnx is in place.
    """
    src = resolve_hf_dir(model_dir)
    if src is None:
        p = Path(model_dir)
        if not p.exists():
            raise InputError(f"{p}: no such directory; give a Hugging Face model directory (with config.json)")
        raise InputError(f"{p}: not a Hugging Face model directory (no config.json); give the directory saved by save_pretrained")
    out = Path(out)
    if out.is_dir():
        out = out / model_io.MODEL_FILE
    if out.suffix != ".onnx":
        raise OutputError(f"{out}: export writes an .onnx file; give a path ending in .onnx")
    data_name = atomic.data_file_for(out, atomic.referenced_data_files(out))
    tokenizer = [] if out.parent.resolve() == src.resolve() else [
        preflight.Output("-o (tokenizer)", out.parent / n) for n in TOKENIZER_FILES if (src / n).is_file()]
    preflight.check(preflight.directory_inputs("model file", src),
                    [preflight.Output("-o", out), preflight.Output("-o (its weights)", out.parent / data_name), *tokenizer])
    atomic.sweep(out)
    # exports of models small enough to keep a copy of are cached (llmopt/frontend/export_cache.py)
    cache_key = export_cache.key(src, with_past=with_past, opset=opset) if export_cache.worth_storing(src) else None
    cached = export_cache.lookup(cache_key) if cache_key else None
    if cached is not None:  # exported before, from these very files, by this very exporter
        _publish(model_io.load(cached), out, data_name)
        _copy_tokenizer(src, out.parent)
        return out
    model = load_hf_model(src)
    import torch

    torch.manual_seed(0)
    layers, kv_heads, head_dim = kv_geometry(model.config)
    batch, seq, past = 2, 5, 3
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq))
    B, S = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    if with_past:
        P = torch.export.Dim("past_sequence_length")
        attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
        position_ids = torch.arange(past, past + seq).expand(batch, seq)
        past_kv = tuple(torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * layers))
        names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
        args = (input_ids, attention_mask, position_ids, *past_kv)
        input_names = ["input_ids", "attention_mask", "position_ids", *names]
        output_names = ["logits"] + [n.replace("past_key_values", "present") for n in names]
        dynamic_shapes = {
            "input_ids": {0: B, 1: S},
            "attention_mask": {0: B, 1: torch.export.Dim("total_sequence_length")},
            "position_ids": {0: B, 1: S},
            "past": tuple({0: B, 2: P} for _ in range(2 * layers)),
        }
    else:
        args = (input_ids, torch.ones(batch, seq, dtype=torch.int64))
        input_names, output_names = ["input_ids", "attention_mask"], ["logits"]
        dynamic_shapes = {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: S}}
    wrapper = _wrap(model, with_past)
    quiet = contextlib.nullcontext() if verbose else _quiet()
    with quiet:
        try:
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                verbose=verbose,
            )
        except Exception as exc:
            raise InputError(
                f"{src}: torch.onnx export of {type(model).__name__} failed ({first_line(exc)}); "
                "rerun with --verbose for the exporter's log"
            ) from None
    onnx_model = program.model
    _rename_dims(onnx_model, with_past)
    onnx_model.producer_name = "llmopt.export"
    onnx_model.metadata_props["llmopt.architecture"] = type(model).__name__
    onnx_model.metadata_props["llmopt.with_past"] = str(with_past).lower()
    _publish(onnx_model, out, data_name)
    if cache_key:
        export_cache.store(cache_key, lambda path: (shutil.copyfile(out, path),
                                                     shutil.copyfile(out.parent / data_name, path.parent / data_name)))
    _copy_tokenizer(src, out.parent)
    return out


def _publish(onnx_model, out: Path, data_name: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic.staging_path(out)
    try:
        atomic.publish_model(model_io.save(onnx_model, staging / out.name, data_name=data_name), out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files beside the .onnx, so that `compile`, `generate` and `eval` find them there
    (config.json stays behind: beside an .onnx it would make the folder look like a model to export)."""
    if dst.resolve() == src.resolve():
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic.write_atomic(dst / name, (src / name).read_bytes())


def _rename_dims(model, with_past: bool) -> None:
    """The exporter may merge equal dims (e.g. 'sequence_length' and 'total'); name them plainly."""
    import onnx_ir as ir

    for v in model.graph.inputs:
        if v.shape is None:
            continue
        dims = list(v.shape)
        if v.name in ("input_ids", "position_ids"):
            dims[0], dims[1] = ir.SymbolicDim("batch"), ir.SymbolicDim("sequence_length")
        elif v.name == "attention_mask":
            dims[0] = ir.SymbolicDim("batch")
            dims[1] = ir.SymbolicDim("total_sequence_length" if with_past else "sequence_length")
        elif v.name.startswith("past_key_values"):
            dims[0], dims[2] = ir.SymbolicDim("batch"), ir.SymbolicDim("past_sequence_length")
        v.shape = ir.Shape(dims)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings (shown with --verbose)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "transformers", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)

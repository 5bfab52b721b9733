"""ONNX Runtime sessions, made one way for every caller: options (threads, optimization level,
session config), a model refused by ONNX Runtime as one line, feeds cast to what a session takes,
and running an in-memory model through a temporary file (external data, never inlined)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterable

import numpy as np
import onnx_ir as ir

from llmopt.core import atomic, model_io
from llmopt.errors import InputError, first_line


# The CPU provider standing in for a GPU on a QDQ graph: DequantizeLinear -> MatMul computed as
# written (what an int8 GEMM with int32 accumulation gives), not fused into x86 integer kernels,
# which on CPUs without VNNI add u8*s8 pairs in int16 and saturate on full-range int8 weights.
QDQ_AS_WRITTEN = {"session.disable_quant_qdq": "1"}


def session_options(threads: int | None = None, optimization: str = "all", config: dict[str, str] | None = None):
    """ORT session options; ``config`` adds session config entries (such as ``QDQ_AS_WRITTEN``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 4  # errors come back as exceptions (one line); ORT would also print them
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return so


def make_session(path: str | os.PathLike, providers: Iterable[str] = ("CPUExecutionProvider",), threads: int | None = None,
                 optimization: str = "all", config: dict[str, str] | None = None):
    """An ORT session over a model file (by path, so external data is mapped, never inlined); a model
    ONNX Runtime refuses is an ``InputError`` (one line)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, optimization, config),
                                    providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - ORT's Fail/InvalidGraph/InvalidArgument/NotImplemented...
        msg = first_line(exc, 400).split(" failed:", 1)[-1].strip()
        raise InputError(f"{path}: ONNX Runtime cannot load this model ({msg}); the file is damaged or "
                         "uses what ONNX Runtime does not implement") from None


def feeds_for(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds the session takes, float ones cast to the session's float type (an fp16 graph
    verified or timed against its fp32 source gets the same samples, rounded)."""
    types = {i.name: i.type for i in session.get_inputs()}
    cast = {"tensor(float16)": np.float16, "tensor(float)": np.float32}
    sent = {}
    for k, v in feeds.items():
        if k in types:
            want = cast.get(types[k])
            sent[k] = v.astype(want) if want is not None and v.dtype != want and v.dtype.kind == "f" else v
    return sent


def run(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run on the feeds the session takes (see ``feeds_for``); outputs by name."""
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, feeds_for(session, feeds))
    return dict(zip(names, outs))


@contextlib.contextmanager
def saved(model: ir.Model):
    """``model`` saved to a temporary directory (external data); yields the .onnx path."""
    with atomic.temp_dir("verify") as tmp:
        yield model_io.save(model, tmp / model_io.MODEL_FILE)


def run_ir_model(model: ir.Model, feeds_list: list[dict[str, np.ndarray]], providers=("CPUExecutionProvider",),
                 config: dict[str, str] | None = None):
    """Save ``model`` to a temporary directory and run it in ORT on each feed."""
    with saved(model) as path:
        return run_path(path, feeds_list, providers, config)


def run_path(path, feeds_list: list[dict[str, np.ndarray]], providers=("CPUExecutionProvider",),
             config: dict[str, str] | None = None):
    sess = make_session(path, providers, config=config)
    return [run(sess, f) for f in feeds_list]

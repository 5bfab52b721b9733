"""Run: the source loaded (a Hugging Face directory exported first, into the work directory) and
the plan's pipeline run over it in memory. Nothing here writes the artifact (``publish`` does)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from llmopt.compiler.plan import Plan
from llmopt.core import graph_util, model_io
from llmopt.core.manager import PassManager, PipelineResult
from llmopt.ort.calibration import SOURCE_DIR_KEY


@dataclasses.dataclass
class Loaded:
    """The source as the pipeline gets it, and its figures before any pass."""

    file: Path  # the .onnx file (the exported one for a Hugging Face source)
    model: Any  # its IR, weights memory-mapped; the pipeline changes it in place
    files: list[Path]  # the .onnx file and its external data
    export_seconds: float | None  # None: not exported
    nodes: int
    ops: dict[str, int]


def load(plan: Plan, work: Path) -> Loaded:
    """The plan's source, exported into ``work`` first if it is a Hugging Face directory."""
    options = plan.options
    seconds = None
    if plan.hf_dir is not None:
        from llmopt.frontend.exporter import export

        options.log(f"export  {plan.hf_dir} (torch.onnx dynamo{', with KV cache I/O' if options.with_past else ''})")
        t0 = time.perf_counter()
        src_file = export(plan.hf_dir, work / "source" / model_io.MODEL_FILE, with_past=options.with_past)
        seconds = round(time.perf_counter() - t0, 2)
        ir_model = model_io.load(src_file)  # weights stay memory-mapped
        src_files = model_io.model_files(src_file, ir_model)
    else:
        src_file, ir_model, src_files = plan.source.file, plan.source.model, plan.source.files
    options.log(f"load    {src_file.name} ({model_io.files_bytes(src_files) / 1e6:.1f} MB, weights memory-mapped)")
    return Loaded(src_file, ir_model, src_files, seconds, graph_util.node_count(ir_model), graph_util.op_histogram(ir_model))


def run_pipeline(plan: Plan, loaded: Loaded) -> PipelineResult:
    """The plan's pipeline over ``loaded.model`` (in place), one progress line per pass."""
    options = plan.options
    total = len(plan.pipeline.pass_specs())

    def on_start(i, spec):
        options.log(f"pass    [{i}/{total}{'+' if i > total else ''}] {spec}")

    def on_end(i, rec):
        counters = ", ".join(f"{k}={v}" for k, v in rec.counters.items() if v) or "no change"
        options.log(f"        {rec.nodes_before}→{rec.nodes_after} nodes, {rec.seconds:.2f}s, {counters}")

    manager = PassManager(
        plan.pipeline, verify_each=options.verify_each, thresholds=plan.target.thresholds, on_start=on_start,
        on_end=on_end, source=plan.model, explain=options.explain, check_plugins=options.check_plugins,
    )
    loaded.model.metadata_props[SOURCE_DIR_KEY] = str(plan.source_dir)  # calibration finds the tokenizer/text there
    try:
        return manager.run(loaded.model)
    finally:
        loaded.model.metadata_props.pop(SOURCE_DIR_KEY, None)  # a local path: not part of the artifact

"""Shared by the benchmark scripts: machine description and a work directory."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
        flags = re.search(r"Flags:\s*(.+)", lscpu).group(1).split()
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
        info["caches"] = {m.group(1): m.group(2).strip() for m in re.finditer(r"^(L1d|L2|L3) cache:\s*(.+)$", lscpu, re.M)}
    except (OSError, AttributeError):
        info["cpu"] = platform.processor()
    from llmopt.ort.machine import last_level_cache_bytes

    llc = last_level_cache_bytes()
    info["last_level_cache_mib"] = round(llc / 2**20) if llc else None
    import onnx
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    info["onnx"] = onnx.__version__
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a whole child process.

    Runs it under /usr/bin/time: a child forked straight from a big process (this one, holding
    models) can report that parent's RSS as its own peak, since ru_maxrss survives exec.
    """
    import tempfile
    import time

    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        return wall, int(rss.read().split()[-1]) * 1024


PROMPT, NEW = 64, 100  # the generation benchmarks' prompt and new tokens (batch 1)


def agreement(source: Path, artifacts: dict[str, Path]) -> dict:
    """Logits agreement of each artifact with ``source`` (llmopt's verification samples): reported
    for artifacts built unverified (random weights miss the quantized targets' cosine budgets)."""
    from llmopt.ort.verify import Thresholds, verify_files

    out = {}
    for name, path in artifacts.items():
        f = verify_files(source, path, Thresholds()).figures
        out[name] = {"cosine": float(f"{f.cosine:.6g}"), "top1": f.top1, "max_abs": float(f"{f.max_abs:.3g}")}
    return out


def generation_speed(gen, seed: int) -> dict:
    """One batch-1 generation by llmopt's loop: a ``PROMPT``-token random prompt, then ``NEW`` tokens;
    prefill tok/s = PROMPT / prefill seconds, decode tok/s = decode steps / their seconds."""
    import numpy as np

    prompt = np.random.default_rng(seed).integers(10, 1000, size=PROMPT).tolist()
    r = gen.generate([prompt], NEW, eos_token_id=-1)
    return {"prefill_tokens_per_s": PROMPT / r.prefill_seconds, "decode_tokens_per_s": (NEW - 1) / sum(r.step_seconds)}


def round_robin(gens: dict, rounds: int) -> dict[str, list[dict]]:
    """``generation_speed`` of every generator once per round, alternated, after one warm-up each."""
    for g in gens.values():
        generation_speed(g, 0)
    runs: dict[str, list[dict]] = {k: [] for k in gens}
    for r in range(rounds):
        for k, g in gens.items():
            runs[k].append(generation_speed(g, r + 1))
    return runs

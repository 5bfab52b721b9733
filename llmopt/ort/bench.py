"""`llmopt bench`: what serving a decoder costs — load time, prefill and decode speed, memory
including the KV cache, and how close decode gets to the memory-bandwidth limit.

Decode is memory-bound: every new token reads all weights and the whole cache once. So the
roofline time of a decode step is (weight bytes + cache bytes read) / memory bandwidth, and the
fraction of the roofline reached is that time over the measured step time. Bandwidth is measured
here by reading a 1 GiB buffer with the run's thread count and with two and four times it, best of
five (one core's outstanding misses can leave its reader short of what the memory delivers, and
the roofline must be the machine's limit, not one reader's). Weights that fit the last-level cache
get a note instead: their steps are not bound by memory.

With a baseline, the two models run alternately (artifact, baseline, artifact, ...) in one process,
and ratios are medians over the repeats, so a noisy machine moves both alike.
"""

from __future__ import annotations

import dataclasses
import io
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmopt.core import model_io
from llmopt.core.experts import ExpertGroup, expert_groups
from llmopt.ort import machine
from llmopt.core.atomic import write_atomic
from llmopt.errors import InputError
from llmopt.ort.generation import Generator
from llmopt.reporting.format import fmt_fixed, fmt_mib, fmt_pct, round_significant
from llmopt.reporting.manifest import bench_batches
from llmopt.reporting.sections_bench import ratio_notes

SCHEMA = "llmopt/bench-report/v1"  # llmopt/schemas/bench-report.v1.json


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    prompt_len: int = 128
    new_tokens: int = 100
    batches: tuple[int, ...] = (1,)
    repeats: int = 3
    threads: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.prompt_len < 1 or self.new_tokens < 2:
            raise InputError("--prompt-len must be >= 1 and --new-tokens >= 2")
        if not self.batches or min(self.batches) < 1:
            raise InputError("--batch takes positive sizes, e.g. --batch 1,4,8")
        if self.repeats < 1:
            raise InputError("--repeats must be >= 1")
        if self.threads < 1:
            raise InputError(f"--threads {self.threads}: must be >= 1 (the intra-op threads ONNX Runtime uses)")


PROBE_MIB, PROBE_ROUNDS = 1024, 5


def probe_method(threads: int) -> str:
    counts = "/".join(str(t) for t in _probe_threads(threads))
    return (f"best of {PROBE_ROUNDS} sums of a {PROBE_MIB} MiB buffer (numpy, disjoint parts) by each of {counts} "
            "threads, in a child process")


def _probe_threads(threads: int) -> list[int]:
    """The thread counts tried: the run's, and twice and four times it (a core's few outstanding
    misses can leave one reader short of the memory's limit; more readers find it)."""
    return sorted({threads, min(2 * threads, 32), min(4 * threads, 32)})


def memory_bandwidth(threads: int, megabytes: int = PROBE_MIB, rounds: int = PROBE_ROUNDS) -> float:
    """Bytes per second the memory delivers to readers summing disjoint parts of one buffer far
    larger than any cache: the best over rounds and over ``_probe_threads(threads)`` reader counts.
    Measured in a child process, so its buffer never counts in this process's peak RSS."""
    code = (f"from llmopt.ort.bench import _bandwidth_probe; "
            f"print(max(_bandwidth_probe(t, {int(megabytes)}, {int(rounds)}) for t in {_probe_threads(threads)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _bandwidth_probe(threads: int, megabytes: int, rounds: int) -> float:
    data = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(rounds):
        ts = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = max(best, data.nbytes / (time.perf_counter() - t0))
    return best


GATHER_OPS = ("Gather", "GatherBlockQuantized")


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    """A model's weights as a decode step reads them."""

    total: int  # every initializer's bytes
    gathered: int  # bytes of tables only ever indexed by Gather (embeddings): a step reads one row per token
    gathered_rows: int  # rows of those tables, summed (bytes per row = gathered / rows, table by table below)
    row_bytes: int  # bytes of one row of each gathered table, summed over the tables
    experts: tuple[ExpertGroup, ...] = ()  # mixture-of-experts tensors (llmopt.core.experts)

    @property
    def expert_bytes(self) -> int:
        return sum(g.bytes for g in self.experts)

    def read_per_step(self, batch: int) -> int:
        """Bytes a decode step of ``batch`` sequences reads: everything but the gathered tables and the
        experts, plus one row of each table per sequence (a table also read by a MatMul, e.g. a tied
        lm_head, counts whole) and the experts the step's tokens are expected to use (k of E per
        token, ``ExpertGroup.fraction_read``)."""
        experts = sum(g.bytes * g.fraction_read(batch) for g in self.experts)
        return int(self.total - self.gathered - self.expert_bytes + min(self.gathered, batch * self.row_bytes) + experts)


def weight_bytes(path: Path) -> WeightBytes:
    model = model_io.load(model_io.resolve_model_file(path))
    groups = tuple(expert_groups(model))
    in_experts = {name for g in groups for name in g.tensors}
    total = gathered = rows = row_bytes = 0
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is None:
            continue
        total += t.nbytes
        if value.name in in_experts:
            continue
        uses = value.uses()
        if uses and t.shape.rank() >= 2 and all(u.node.op_type in GATHER_OPS and u.idx != 1 for u in uses):
            gathered += t.nbytes
            rows += int(t.shape[0])
            row_bytes += t.nbytes // max(1, int(t.shape[0]))
    return WeightBytes(total, gathered, rows, row_bytes, groups)


def _one(gen: Generator, batch: int, s: BenchSettings) -> dict[str, Any]:
    rng = np.random.default_rng(s.seed + batch)
    prompts = rng.integers(10, gen.vocab_size if gen.vocab_size < 2**31 else 1000, size=(batch, s.prompt_len)).tolist()
    r = gen.generate(prompts, s.new_tokens, eos_token_id=-1)
    steps = np.array(r.step_seconds)
    return {
        "prefill_s": r.prefill_seconds,
        "decode_s": float(steps.sum()),
        "steps_ms": (steps * 1e3).tolist(),
        "cache_bytes": gen.last_cache_bytes,
    }


def benchmark(artifact: str | os.PathLike, baseline: str | os.PathLike | None = None, settings: BenchSettings = BenchSettings(),
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``artifact`` (and ``baseline``, alternately); returns the report `llmopt bench --json` prints."""
    models = {"artifact": Path(artifact)}
    if baseline is not None:
        models["baseline"] = Path(baseline)
    gens: dict[str, Generator] = {}
    loads: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(settings.repeats):  # load time: alternate too, keep the last session
        for key, path in models.items():
            g = Generator(path, threads=settings.threads, naive=(key == "baseline" and _naive(path)))
            loads[key].append(g.load_seconds)
            gens[key] = g
    bandwidth = memory_bandwidth(settings.threads)
    llc = machine.last_level_cache_bytes()
    out: dict[str, Any] = {"schema": SCHEMA, "settings": dataclasses.asdict(settings), "memory_bandwidth_gbs": round(bandwidth / 1e9, 2),
                           "memory_bandwidth_method": probe_method(settings.threads),
                           "machine": {"cpu": machine.cpu_model(), "last_level_cache_bytes": llc},
                           "models": {}}
    weights = {key: weight_bytes(path) for key, path in models.items()}
    total_runs = len(settings.batches) * settings.repeats * len(models)
    done = 0
    for key, path in models.items():
        g = gens[key]
        out["models"][key] = {"path": str(path), "load_s_median": round(statistics.median(loads[key]), 4),
                              "kv_buffer": g.layout.buffer, "loop": "naive (numpy round trip)" if g.naive else "IOBinding",
                              "weights_bytes": weights[key].total, "weights_bytes_gathered": weights[key].gathered,
                              "weights_bytes_experts": weights[key].expert_bytes,
                              "batches": {}}
    for batch in settings.batches:
        runs: dict[str, list[dict]] = {k: [] for k in models}
        for g in gens.values():  # warm up
            _one(g, batch, dataclasses.replace(settings, new_tokens=4))
        for _ in range(settings.repeats):
            for key in models:
                runs[key].append(_one(gens[key], batch, settings))
                done += 1
                if progress:
                    progress(f"[{done}/{total_runs}] {key} batch {batch}")
        for key in models:
            out["models"][key]["batches"][str(batch)] = _summarize(runs[key], gens[key], batch, settings,
                                                                   weights[key], bandwidth, llc)
        if baseline is not None:
            a, b = runs["artifact"], runs["baseline"]
            out.setdefault("ratios", {})[str(batch)] = {
                "decode_speedup": round(statistics.median(y["decode_s"] / x["decode_s"] for x, y in zip(a, b)), 3),
                "prefill_speedup": round(statistics.median(y["prefill_s"] / x["prefill_s"] for x, y in zip(a, b)), 3),
            }
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _naive(path: Path) -> bool:
    """The baseline runs as people first write the loop unless it was compiled by llmopt."""
    model_file = model_io.resolve_model_file(path)
    return not (model_file.parent / "llmopt.json").is_file()


def _summarize(runs: list[dict], gen: Generator, batch: int, s: BenchSettings, weights: WeightBytes, bandwidth: float,
               llc: int | None) -> dict:
    decode = statistics.median(r["decode_s"] for r in runs)
    steps = [ms for r in runs for ms in r["steps_ms"]]
    n = s.new_tokens - 1  # decode steps after the prefill's token
    positions = s.prompt_len + n  # the cache length at the end
    formula = gen.layout.bytes(batch, positions)
    mean_cache_read = gen.layout.bytes(batch, s.prompt_len + n // 2)
    step_s = decode / n
    read = weights.read_per_step(batch) + mean_cache_read
    roofline_s = read / bandwidth
    note = None
    if llc is not None and read <= llc:
        note = (f"a step reads {fmt_mib(read)}, which fits in the {fmt_mib(llc, 0)} last-level cache: "
                "steps are served from cache, so this is not a memory-bandwidth roofline")
    elif roofline_s > step_s:
        note = (f"a step streams {fmt_fixed(read / step_s / 1e9, 1, ' GB/s')}, faster than the bandwidth probe read "
                f"({fmt_fixed(bandwidth / 1e9, 1, ' GB/s')}): the probe is below this machine's limit, so the fraction overstates")
    return {
        "prefill_tokens_per_s": round(batch * s.prompt_len / statistics.median(r["prefill_s"] for r in runs), 1),
        "decode_tokens_per_s": round(batch * n / decode, 1),
        "decode_s_per_token": decode / n / batch,  # time for N new tokens / N / batch
        "step_ms_p50": round(float(np.percentile(steps, 50)), 3),
        "step_ms_p90": round(float(np.percentile(steps, 90)), 3),
        "kv_cache_bytes": formula,
        "kv_cache_bytes_measured": runs[-1]["cache_bytes"],
        "kv_cache_bytes_allocated_shared": gen.layout.bytes(batch, s.prompt_len + s.new_tokens) if gen.layout.buffer == "shared" else None,
        "bytes_read_per_step": read,
        "roofline_step_ms": round_significant(roofline_s * 1e3),  # a tiny model's step is ~0.02 ms: digits, not decimals
        "roofline_fraction": round_significant(roofline_s / step_s),
        "roofline_note": note,
        "steps_ms_last_run": [round(x, 3) for x in runs[-1]["steps_ms"]],
    }


def format_bench(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [f"prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens, {s['threads']} threads, "
             f"median of {s['repeats']} runs; memory bandwidth {r['memory_bandwidth_gbs']} GB/s"]
    lines.append("| model | batch | load s | prefill tok/s | decode tok/s | step ms p50 / p90 | KV cache | roofline |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for key, m, batch, b in bench_batches(r):
        lines.append(f"| {key} ({m['loop']}, {m['kv_buffer']}) | {batch} | {fmt_fixed(m['load_s_median'], 3)} | "
                     f"{fmt_fixed(b['prefill_tokens_per_s'], 0)} | {fmt_fixed(b['decode_tokens_per_s'], 0)} | "
                     f"{fmt_fixed(b['step_ms_p50'])} / {fmt_fixed(b['step_ms_p90'])} | {fmt_mib(b['kv_cache_bytes'])} | "
                     f"{fmt_pct(b['roofline_fraction'], False, 0)} |")
    lines += ratio_notes(r, lambda v: fmt_fixed(v, 2, "x"))
    notes = sorted({b["roofline_note"] for _, _, _, b in bench_batches(r) if b.get("roofline_note")})
    lines += [f"roofline: {n}" for n in notes[:1]]
    llc = (r.get("machine") or {}).get("last_level_cache_bytes")
    rss = f"peak RSS of this process {fmt_mib(r['peak_rss_bytes'], 0)} (bandwidth probe excluded)"
    lines.append(f"{rss}; CPU {(r.get('machine') or {}).get('cpu', '?')}, last-level cache {fmt_mib(llc, 0)}" if llc else rss)
    return "\n".join(lines)


def progress_bar(total_hint: str = "") -> Callable[[str], None]:
    def show(msg: str) -> None:
        print(f"\rbench {msg}{total_hint}   ", end="", file=sys.stderr, flush=True)

    return show


def plot_steps(report: dict[str, Any] | None, out: Path) -> None:
    """Decode step latency against position, one line per model and batch (``report=None``: check only)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib (pip install matplotlib)") from None
    if report is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    start = report["settings"]["prompt_len"]
    for key, _, batch, b in bench_batches(report):
        steps = b.get("steps_ms_last_run") or []
        ax.plot(range(start, start + len(steps)), steps, label=f"{key}, batch {batch}")
    ax.set_xlabel("position (tokens in the cache)")
    ax.set_ylabel("ms per decode step")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)
    write_atomic(out, buf.getvalue())

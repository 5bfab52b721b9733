"""Side-by-side latency: run A and B alternately and report medians and the ratio
(absolute times drift on shared machines; ratios measured this way hold)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from llmopt.ort import verify

from llmopt.ort import sessions


def decode_feeds(model, past: int = 128, batch: int = 1) -> dict[str, np.ndarray]:
    """One new token after ``past`` cached tokens (or a 1-token call for cache-less models)."""
    has_past = verify.has_past_inputs(model)
    return verify.sample_inputs(model, verify.SampleShape(batch, 1, past if has_past else 0), seed=123)


def alternate(run_a, run_b, pairs: int = 20, warmup: int = 3) -> dict[str, float]:
    """Time ``run_a`` and ``run_b`` alternately; median seconds of each and of the ratio a/b."""
    for _ in range(warmup):
        run_a()
        run_b()
    ta, tb, ratios = [], [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        run_a()
        t1 = time.perf_counter()
        run_b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return {
        "a_ms": statistics.median(ta) * 1e3,
        "b_ms": statistics.median(tb) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": pairs,
    }


def recompute_feeds(model, context: int = 128, batch: int = 1) -> dict[str, np.ndarray]:
    """The next token after ``context`` tokens for a model without a cache: all context + 1 tokens."""
    return verify.sample_inputs(model, verify.SampleShape(batch, context + 1, 0), seed=123)


def compare_sessions(sess_a, sess_b, feeds: dict[str, np.ndarray], pairs: int = 20, warmup: int = 3) -> dict[str, float]:
    return compare_sessions_feeds(sess_a, feeds, sess_b, feeds, pairs, warmup)


def compare_sessions_feeds(sess_a, feeds_a, sess_b, feeds_b, pairs: int = 20, warmup: int = 3) -> dict[str, float]:
    """Like compare_sessions, with each session's own inputs."""
    names_a = [o.name for o in sess_a.get_outputs()]
    names_b = [o.name for o in sess_b.get_outputs()]
    fa, fb = sessions.feeds_for(sess_a, feeds_a), sessions.feeds_for(sess_b, feeds_b)
    return alternate(lambda: sess_a.run(names_a, fa), lambda: sess_b.run(names_b, fb), pairs, warmup)

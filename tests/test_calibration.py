"""Calibration: streaming observers agree with the same statistics computed on all data at once,
and data sources give clear errors."""

import numpy as np
import pytest

import llmopt
from llmopt.ort import calibration as cal
from llmopt.errors import InputError


def _chunks():
    rng = np.random.default_rng(1)
    return [rng.standard_t(3, size=(4, 16, 8)).astype(np.float32) for _ in range(10)]


def test_observers_stream_to_the_batch_statistics():
    chunks = _chunks()
    full = np.concatenate([c.reshape(-1, 8) for c in chunks])
    mm, hist, ch, gram = cal.MinMax(), cal.Histogram(), cal.ChannelStats(), cal.Gram()
    for c in chunks:
        for o in (mm, hist, ch, gram):
            o.update(c)
    assert mm.range() == (full.min(), full.max())
    np.testing.assert_allclose(ch.amax, np.abs(full).max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(ch.norm, np.linalg.norm(full.astype(np.float64), axis=0), rtol=1e-9)
    np.testing.assert_allclose(gram.xtx, full.T.astype(np.float64) @ full, rtol=1e-9)
    lo, hi = hist.range("percentile", 99.0)
    want = np.percentile(np.abs(full), 99.0)
    assert abs(hi - want) <= hist.top / hist.bins * 2 and lo == -hi
    lo_e, hi_e = hist.range("entropy")
    assert 0 < hi_e <= np.abs(full).max() + hist.top / hist.bins


def test_histogram_grows_its_range():
    h = cal.Histogram(bins=64)
    h.update(np.array([0.5, -1.0], np.float32))
    h.update(np.array([100.0], np.float32))
    assert h.top >= 100 and h.counts.sum() == 3


def test_collect_reads_intermediate_values_without_changing_the_model(exported):
    model = llmopt.load(exported("llama", True))
    outputs = [v.name for v in model.graph.outputs]
    name = next(n.inputs[0].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None)
    batches = cal.token_batches("random", None, seq_len=8, samples=3, vocab=512)
    obs = cal.collect(model, [name], batches, lambda _: [cal.ChannelStats()])
    assert obs[name][0].rows == 3 * 8
    assert [v.name for v in model.graph.outputs] == outputs


def test_token_batch_sources():
    from llmopt.frontend.exporter import reference_model_dir

    ref = reference_model_dir()
    b = cal.token_batches("builtin", ref, seq_len=64, samples=4, vocab=4096)
    assert len(b) == 4 and b[0].shape == (1, 64)
    assert len(cal.token_batches(np.arange(300) % 50, None, seq_len=100, samples=9)) == 3
    assert len(cal.token_batches([[1, 2, 3]] * 40, None, seq_len=30, samples=2)) == 2
    with pytest.raises(InputError, match="need at least"):
        cal.token_batches(np.arange(10), None, seq_len=64)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        cal.token_batches(np.arange(200), None, seq_len=64, vocab=100)
    with pytest.raises(InputError, match="tokenizer.json"):
        cal.token_batches("builtin", None, seq_len=64, vocab=512)  # not the reference model, no tokenizer
    with pytest.raises(InputError, match="not found"):
        cal.token_batches("/nonexistent.txt", ref, seq_len=64)

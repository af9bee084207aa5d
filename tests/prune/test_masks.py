"""Mask selection in bounded memory (prune/masks.py): rows ranked CHUNK scores at a time and a large
layer by a radix select (`lowest_k`) choose what a topk over the whole tensor chooses, ties included
in number, and hold little beside the scores and the mask."""
import ctypes
from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.prune import masks
from sparsecc.prune.masks import lowest_k, nm_mask, unstructured_mask


def _topk_mask(scores, sparsity, per_row):
    """The selection as one topk over the layer (or over every row at once)."""
    keep = torch.ones(scores.shape, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    else:
        k = int(scores.numel() * sparsity)
        if k:
            keep.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return keep


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), sparsity=st.floats(0, 0.99), seed=st.integers(0, 2 ** 16),
       per_row=st.booleans(), chunk=st.sampled_from([1, 7, 64, 4096]), transposed=st.booleans())
def test_chunked_selection_equals_one_topk(rows, cols, sparsity, seed, per_row, chunk, transposed):
    """Distinct scores: the chunked selection (radix select for the layer) is the topk's, bit for bit,
    for scores laid out row-major or transposed (GPT-2's Conv1D weights are pruned through a view)."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(cols, rows, generator=g).t() if transposed else torch.rand(rows, cols, generator=g)) + 1e-3
    with patch.object(masks, "CHUNK", chunk), patch.object(masks, "LARGE", 0):
        assert torch.equal(unstructured_mask(scores, sparsity, per_row), _topk_mask(scores, sparsity, per_row))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), sparsity=st.floats(0.01, 0.99), levels=st.integers(1, 6),
       chunk=st.sampled_from([5, 64, 300]))
def test_ties_prune_exactly_k_spread_evenly(seed, sparsity, levels, chunk):
    """Many equal scores (already pruned zeros, -0.0 among them; a few levels, as bf16 weights tie):
    exactly k are pruned, every score below the k-th lowest value t is, none above it is, and of the
    E scores equal to t the ones pruned are spread evenly in row-major order (the i-th when
    floor((i+1)·ties/E) > floor(i·ties/E))."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (30, 40), generator=g).float() / levels
    scores[torch.rand(30, 40, generator=g) < 0.1] = -0.0
    with patch.object(masks, "CHUNK", chunk), patch.object(masks, "LARGE", 0):
        keep = unstructured_mask(scores, sparsity, per_row=False)
    k = int(scores.numel() * sparsity)
    t = torch.kthvalue(scores.flatten(), k).values
    assert int((~keep).sum()) == k
    assert bool((scores[~keep] <= t).all()) and bool((scores[keep] >= t).all())
    equal = (scores == t).flatten()
    ties, total = k - int((scores < t).sum()), int(equal.sum())
    i = torch.arange(total)
    assert torch.equal(~keep.flatten()[equal], (i + 1) * ties // total > i * ties // total)


def test_negative_or_non_fp32_scores_are_ranked_by_value(monkeypatch):
    """lowest_k ranks non-negative fp32 bits; other scores go through the topk (the same choice)."""
    monkeypatch.setattr(masks, "CHUNK", 16)
    monkeypatch.setattr(masks, "LARGE", 0)
    g = torch.Generator().manual_seed(0)
    for scores in (torch.randn(20, 30, generator=g), torch.rand(20, 30, generator=g).double()):
        assert torch.equal(unstructured_mask(scores, 0.4, per_row=False), _topk_mask(scores, 0.4, per_row=False))


def test_lowest_k_is_what_the_layer_selection_runs(monkeypatch):
    """A layer of over LARGE non-negative fp32 scores takes the radix select (so the tests above check it)."""
    calls = []
    monkeypatch.setattr(masks, "CHUNK", 64)
    monkeypatch.setattr(masks, "LARGE", 500)
    monkeypatch.setattr(masks, "lowest_k", lambda *a: calls.append(a) or lowest_k(*a))
    unstructured_mask(torch.rand(20, 30), 0.5, per_row=False)
    assert len(calls) == 1


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 30), groups=st.integers(1, 12), nm=st.sampled_from([(1, 2), (2, 4), (3, 8)]),
       seed=st.integers(0, 2 ** 16), chunk=st.sampled_from([1, 16, 4096]))
def test_nm_rows_in_chunks_equal_all_rows_at_once(rows, groups, nm, seed, chunk):
    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    whole = nm_mask(scores, n, m)
    with patch.object(masks, "CHUNK", chunk):
        assert torch.equal(nm_mask(scores, n, m), whole)
    assert nm_mask(torch.rand(rows, 0), n, m).shape == (rows, 0) and bool((whole.reshape(rows, groups, m).sum(-1) == n).all())


def _peak_bytes_of(fn) -> int:
    """The resident set fn adds at its peak (VmHWM reset through /proc/self/clear_refs)."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    try:
        ctypes.CDLL(None).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    base = status("VmRSS")
    fn()
    return status("VmHWM") - base


def test_a_large_layer_is_selected_in_a_few_bytes_a_score():
    """5M scores (20 MiB), over LARGE: the layer's selection adds its mask (5 MiB) and some MiB of chunks;
    the topk over the whole layer adds ~26 bytes a score (here ~130 MiB)."""
    scores = torch.rand(2048, 2560) + 1e-3
    keep = []
    assert _peak_bytes_of(lambda: keep.append(unstructured_mask(scores, 0.5, per_row=False))) < 64 * 2 ** 20
    assert int((~keep[0]).sum()) == scores.numel() // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_onloading_estimate_covers_each_methods_measured_peak(dtype):
    """passes/memory.py:plan_bytes, less the pass's undo copy, bounds the measured peak of making one
    linear's decision (8M weights: a whole-layer topk, or an extra score copy, would exceed it)."""
    from sparsecc import MagnitudeConfig, RTNConfig, WandaConfig
    from sparsecc.passes.memory import plan_bytes
    from sparsecc.prune import magnitude, rtn, wanda

    w = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(0)).to(dtype)
    norm = torch.rand(2048, generator=torch.Generator().manual_seed(1))
    runs = [(MagnitudeConfig(0.5), lambda: magnitude(w, 0.5)),
            (MagnitudeConfig(0.5, group="output"), lambda: magnitude(w, 0.5, group="output")),
            (WandaConfig(0.5), lambda: wanda(w, norm, 0.5)), (WandaConfig(pattern="2:4"), lambda: wanda(w, norm, pattern="2:4")),
            (RTNConfig(bits=4), lambda: rtn(w, 4, 128))]
    for config, decide in runs:
        out = []
        peak = _peak_bytes_of(lambda: out.append(decide()))
        assert peak <= plan_bytes(config, w.numel(), w.element_size()) - w.numel() * w.element_size(), config

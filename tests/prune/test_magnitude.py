"""Magnitude masks: exact counts, N:M groups, identity at sparsity 0 (hypothesis)."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecc.prune import magnitude

shapes = st.tuples(st.integers(1, 12), st.integers(1, 6).map(lambda k: 8 * k))


@given(shape=shapes, s=st.floats(0, 0.99), seed=st.integers(0, 2**16), group=st.sampled_from(["layer", "output"]))
def test_unstructured_exact_counts(shape, s, seed, group):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    keep = magnitude(w, s, group=group)
    if group == "layer":
        assert (~keep).sum() == int(w.numel() * s)
    else:
        assert ((~keep).sum(1) == int(shape[1] * s)).all()
    if (~keep).any() and keep.any():  # every pruned weight is no larger than every kept one (per group)
        if group == "layer":
            assert w.abs()[~keep].max() <= w.abs()[keep].min()


@given(shape=shapes, seed=st.integers(0, 2**16), nm=st.sampled_from(["1:2", "2:4", "4:8", "1:4", "3:8"]))
def test_nm_keeps_exactly_n_per_group(shape, seed, nm):
    n, m = map(int, nm.split(":"))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    keep = magnitude(w, pattern=nm).reshape(shape[0], -1, m)
    assert (keep.sum(-1) == n).all()


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_sparsity_zero_is_identity(shape, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert magnitude(w, 0.0).all() and magnitude(w, 0.0, group="output").all()


def test_transposed_weights_get_the_same_mask():
    """GPT-2's Conv1D weights are pruned through a transposed view ([out, in] of an [in, out] tensor)."""
    w = torch.randn(12, 20)
    for group in ("layer", "output"):
        torch.testing.assert_close(magnitude(w.t().contiguous(), 0.5, group=group),
                                   magnitude(w.t(), 0.5, group=group))

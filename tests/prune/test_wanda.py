"""Wanda: score |W|*||X||, per-row counts, N:M groups, equivalence with per-output magnitude."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecc.errors import RecipeError
from sparsecc.prune.magnitude import magnitude
from sparsecc.prune.wanda import wanda, wanda_scores

shapes = st.tuples(st.integers(1, 10), st.integers(1, 6).map(lambda k: 8 * k))


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.rand(shape[1], generator=g) * 5


@given(shape=shapes, s=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_per_row_counts_and_order(shape, s, seed):
    w, a = _data(shape, seed)
    keep = wanda(w, a, s)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert ((~keep).sum(1) == int(shape[1] * s)).all()
    score = w.abs() * a
    for r in range(shape[0]):  # within a row, every pruned score <= every kept score
        if (~keep[r]).any() and keep[r].any():
            assert score[r][~keep[r]].max() <= score[r][keep[r]].min()


@given(shape=shapes, seed=st.integers(0, 2**16), nm=st.sampled_from(["1:2", "2:4", "4:8"]))
def test_nm_keeps_exactly_n(shape, seed, nm):
    n, m = map(int, nm.split(":"))
    w, a = _data(shape, seed)
    keep = wanda(w, a, pattern=nm).reshape(shape[0], -1, m)
    assert (keep.sum(-1) == n).all()


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_sparsity_zero_is_identity(shape, seed):
    w, a = _data(shape, seed)
    assert wanda(w, a, 0.0).all()


@given(shape=shapes, s=st.floats(0, 0.99), seed=st.integers(0, 2**16), c=st.sampled_from([1.0, 0.25, 8.0]))
def test_constant_act_norm_is_per_output_magnitude(shape, s, seed, c):
    w, _ = _data(shape, seed)
    assert torch.equal(wanda(w, torch.full((shape[1],), c), s), magnitude(w, s, group="output"))


def test_activations_change_the_choice():
    # the seed's example (002): the column with the large input norm survives despite small |W|
    w = torch.tensor([[4.0, 0.0, 1.0, -1.0], [3.0, -2.0, -1.0, -3.0], [-3.0, 1.0, 0.0, 2.0]])
    a = torch.tensor([1.0, 2.0, 8.0, 3.0])
    assert torch.equal(wanda_scores(w, a), w.abs() * a)
    keep = wanda(w, a, 0.5)
    # the seed's "Pruned Weights" (grouped per output): [[4, 0, 1, 0], [0, 0, -1, -3], [-3, 0, 0, 2]]
    assert torch.equal(keep, torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool))
    assert not magnitude(w, 0.5, group="output")[1, 2]  # |W| alone drops the column with ||X|| = 8


def test_bad_inputs():
    w = torch.randn(4, 8)
    with pytest.raises(RecipeError, match=r"act_norm of shape \[in\]"):
        wanda(w, torch.ones(7))
    with pytest.raises(RecipeError, match="act_norm"):
        wanda(w, torch.ones(4, 8))
    with pytest.raises(RecipeError, match="non-negative"):
        wanda(w, -torch.ones(8))
    with pytest.raises(RecipeError, match="2-D"):
        wanda(torch.randn(8), torch.ones(8))
    with pytest.raises(RecipeError, match="multiple of 3"):
        wanda(w, torch.ones(8), pattern="1:3")
    with pytest.raises(RecipeError, match="0 < N < M"):
        wanda(w, torch.ones(8), pattern="4:4")
    for s in (-0.1, 1.0, 1.5):
        with pytest.raises(RecipeError, match=r"\[0, 1\)"):
            wanda(w, torch.ones(8), s)

"""OWL: outlier ratio D = P(A > m E[A]); layer sparsities keep the (weighted) mean, stay within
+-lambda and are lower for layers with more outliers."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecc.errors import RecipeError
from sparsecc.prune.owl import outlier_ratio, outlier_ratio_of, owl_sparsities


def test_outlier_ratio_counts_entries_above_m_times_mean():
    a = torch.ones(10, 10)
    a[0, :3] = 100.0  # mean = (97 + 300) / 100 = 3.97; 5 * mean = 19.85
    assert outlier_ratio(a, 5.0) == pytest.approx(0.03)
    assert outlier_ratio(a, 30.0) == 0.0
    assert outlier_ratio(torch.ones(4, 4), 1.0) == 0.0  # "greater than", not ">="
    # pooled: the mean is over all entries of all the layer's linears
    b = torch.ones(10, 10)
    assert outlier_ratio_of([a, b], 5.0) == pytest.approx(3 / 200)
    assert outlier_ratio_of([a], 5.0) == outlier_ratio(a, 5.0)


ratios = st.dictionaries(st.sampled_from([f"layers.{i}" for i in range(12)]), st.floats(0, 0.3),
                         min_size=1, max_size=12)


@given(r=ratios, target=st.floats(0, 0.95), lam=st.floats(0, 0.2), weighted=st.booleans(),
       mode=st.sampled_from(["proportional", "minmax"]), seed=st.integers(0, 100))
def test_allocation_invariants(r, target, lam, weighted, mode, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = {k: int(torch.randint(1, 1000, (1,), generator=g)) for k in r} if weighted else None
    s = owl_sparsities(r, target, lam, sizes=sizes, mode=mode)
    assert set(s) == set(r)
    w = sizes or {k: 1 for k in r}
    mean = sum(s[k] * w[k] for k in r) / sum(w.values())
    assert mean == pytest.approx(target, abs=1e-9)
    for k in r:
        assert 0 <= s[k] < 1
        assert target - lam - 1e-9 <= s[k] <= target + lam + 1e-9
    for a in r:  # more outliers -> no higher sparsity
        for b in r:
            if r[a] > r[b]:
                assert s[a] <= s[b] + 1e-12


def test_more_outliers_strictly_lower_and_seed_formula():
    r = {"a": 0.01, "b": 0.05, "c": 0.10}
    s = owl_sparsities(r, 0.5, lam=0.2)
    assert s["c"] < s["b"] < s["a"]
    # unclipped: seed 003's S_l = S (1 - D_l) sum_l n_l / sum_l n_l (1 - D_l) (equal sizes)
    alpha = 0.5 * 3 / sum(1 - d for d in r.values())
    for k, d in r.items():
        assert s[k] == pytest.approx(alpha * (1 - d), abs=1e-9)
    # minmax mode spans the whole +-lambda range
    s = owl_sparsities({"a": 0.01, "b": 0.055, "c": 0.10}, 0.5, lam=0.08, mode="minmax")
    assert s == pytest.approx({"a": 0.58, "b": 0.5, "c": 0.42}, abs=1e-9)


def test_clipping_and_weighting():
    r = {"small": 0.0, "big": 0.9}
    s = owl_sparsities(r, 0.6, lam=0.05, sizes={"small": 1, "big": 1})
    assert s["small"] == pytest.approx(0.65) and s["big"] == pytest.approx(0.55)
    s = owl_sparsities({"a": 0.0, "b": 0.5, "c": 0.9}, 0.6, lam=0.05, sizes={"a": 1, "b": 100, "c": 1})
    assert (s["a"] + 100 * s["b"] + s["c"]) / 102 == pytest.approx(0.6, abs=1e-9)
    assert s["a"] == pytest.approx(0.65) and s["c"] == pytest.approx(0.55)


def test_degenerate_cases():
    assert owl_sparsities({"a": 0.1, "b": 0.1}, 0.5) == {"a": 0.5, "b": 0.5}
    assert owl_sparsities({"a": 0.0, "b": 0.2}, 0.0) == {"a": 0.0, "b": 0.0}
    assert owl_sparsities({"a": 0.0, "b": 0.2}, 0.5, lam=0.0) == {"a": 0.5, "b": 0.5}
    s = owl_sparsities({"a": 0.0, "b": 0.2}, 0.97, lam=0.1)
    assert all(v < 1 for v in s.values()) and (s["a"] + s["b"]) / 2 == pytest.approx(0.97)


def test_bad_inputs():
    with pytest.raises(RecipeError):
        owl_sparsities({}, 0.5)
    with pytest.raises(RecipeError):
        owl_sparsities({"a": 0.1}, 1.0)
    with pytest.raises(RecipeError):
        owl_sparsities({"a": 1.5}, 0.5)
    with pytest.raises(RecipeError):
        owl_sparsities({"a": 0.1}, 0.5, lam=-1)
    with pytest.raises(RecipeError, match="sizes"):
        owl_sparsities({"a": 0.1, "b": 0.2}, 0.5, sizes={"a": 3})
    with pytest.raises(RecipeError, match="mode"):
        owl_sparsities({"a": 0.1}, 0.5, mode="linear")
    with pytest.raises(RecipeError):
        outlier_ratio(torch.ones(3), m=0)
    with pytest.raises(RecipeError):
        outlier_ratio_of([], 5.0)

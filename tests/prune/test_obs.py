"""Exact row-wise OBS: optimal reconstruction for its mask, greedy choice, counts, quality vs
SparseGPT, cost guard, dead inputs, failing Cholesky, bad inputs."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecc.errors import CalibrationError, RecipeError
from sparsecc.prune.sparsegpt import dampen
from sparsecc.prune.hessian_error import reconstruction_error
from sparsecc.prune.obs import obs
from sparsecc.prune.sparsegpt import HessianWarning, sparsegpt


def correlated(rows, cols, seed, dtype=torch.float32):
    """W and H = X^T X with X = Z A, A = I + a random rank-4 mix: H is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64)
    a = torch.eye(cols, dtype=torch.float64) + torch.randn(cols, 4, generator=g, dtype=torch.float64) @ \
        torch.randn(4, cols, generator=g, dtype=torch.float64)
    x = z @ a
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w.to(dtype), (x.T @ x).to(dtype), x.to(dtype)


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 5), cols=st.integers(2, 16), s=st.floats(0.05, 0.9),
       chunk=st.sampled_from([1, 3, 1 << 30]))
def test_result_is_the_optimal_reconstruction_for_its_mask(seed, rows, cols, s, chunk):
    """Seed 003 Eq. 2: for the pruned set P, w'_R = w_R + H_RR^-1 H_RP w_P (damped H), in every chunking."""
    w, h, _ = correlated(rows, cols, seed, torch.float64)
    new_w, keep = obs(w, h, s, chunk_bytes=chunk * cols * cols * 8)
    hd, _ = dampen(h, 0.01)
    for r in range(rows):
        R, P = keep[r].nonzero().flatten(), (~keep[r]).nonzero().flatten()
        opt = w[r, R] + torch.linalg.solve(hd[R][:, R], hd[R][:, P] @ w[r, P])
        assert torch.allclose(new_w[r, R], opt, atol=1e-8, rtol=1e-8)


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 5), cols=st.integers(2, 16))
def test_single_removal_is_the_best_single_removal(seed, rows, cols):
    """k = 1: p = argmin w_p^2 / [H^-1]_pp, the exact minimiser over all single removals."""
    w, h, _ = correlated(rows, cols, seed, torch.float64)
    s = 1.5 / cols  # floor(s * cols) = 1
    new_w, keep = obs(w, h, s)
    hd, _ = dampen(h, 0.01)
    for r in range(rows):
        best = min(reconstruction_error(w[r:r + 1], _opt(w[r], hd, p)[None], hd) for p in range(cols))
        assert reconstruction_error(w[r:r + 1], new_w[r:r + 1], hd) == pytest.approx(best, rel=1e-9, abs=1e-12)


def _opt(w, hd, p):
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[p] = False
    out = torch.zeros_like(w)
    out[keep] = w[keep] + torch.linalg.solve(hd[keep][:, keep], hd[keep][:, ~keep] @ w[~keep])
    return out


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 6), cols=st.integers(1, 24), s=st.floats(0, 0.99))
def test_unstructured_counts_per_row(seed, rows, cols, s):
    w, h, _ = correlated(rows, cols, seed)
    new_w, keep = obs(w, h, s)
    assert ((~keep).sum(1) == int(cols * s)).all()
    assert (new_w[~keep] == 0).all() and torch.isfinite(new_w).all() and new_w.dtype == w.dtype


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 6), groups=st.integers(1, 5),
       nm=st.sampled_from(["1:2", "2:4", "4:8"]))
def test_nm_keeps_exactly_n(seed, rows, groups, nm):
    n, m = map(int, nm.split(":"))
    w, h, _ = correlated(rows, groups * m, seed)
    new_w, keep = obs(w, h, pattern=nm)
    assert (keep.reshape(rows, -1, m).sum(-1) == n).all()
    assert (new_w[~keep] == 0).all()


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 6), cols=st.integers(1, 24))
def test_sparsity_zero_is_identity(seed, rows, cols):
    w, h, _ = correlated(rows, cols, seed)
    new_w, keep = obs(w, h, 0.0)
    assert keep.all() and torch.equal(new_w, w)


@given(seed=st.integers(0, 2**16), rows=st.integers(8, 24), cols=st.sampled_from([32, 48, 64]),
       s=st.floats(0.3, 0.7), pattern=st.sampled_from([None, None, "2:4", "4:8"]))
def test_reconstruction_no_worse_than_sparsegpt(seed, rows, cols, s, pattern):
    w, h, _ = correlated(rows, cols, seed)
    e_obs = reconstruction_error(w, obs(w, h, s, pattern)[0], h)
    e_sgpt = reconstruction_error(w, sparsegpt(w, h, s, pattern, blocksize=8)[0], h)
    assert e_obs <= e_sgpt * 1.05


def test_cost_guard():
    with pytest.raises(RecipeError, match=r"OBS on 'big'.*SparseGPT"):
        obs(torch.zeros(4096, 4096), torch.eye(4096), 0.5, name="big")
    w, h, _ = correlated(8, 32, 0)
    with pytest.raises(RecipeError, match="max_cost"):
        obs(w, h, 0.5, max_cost=1e3)
    obs(w, h, 0.5, max_cost=8 * 16 * 32 * 32)  # exactly at the limit: allowed


def test_dead_inputs_and_failing_cholesky():
    w, _, x = correlated(6, 16, 1)
    x[:, [2, 9]] = 0
    h = x.T @ x
    new_w, keep = obs(w, h, 0.5)
    assert torch.isfinite(new_w).all() and (new_w[:, [2, 9]] == 0).all()
    with pytest.warns(HessianWarning, match=r"OBS.*'attn\.o'.*diagonal"):
        new_w, keep = obs(w, -h, 0.5, pattern="2:4", name="attn.o")
    assert torch.isfinite(new_w).all() and (keep.reshape(6, -1, 4).sum(-1) == 2).all()
    assert (new_w[~keep] == 0).all()


def test_bad_inputs():
    w, h, _ = correlated(4, 12, 5)
    with pytest.raises(RecipeError, match=r"\[12, 12\]"):
        obs(w, h[:4])
    with pytest.raises(RecipeError, match="multiple of 8"):
        obs(w, h, pattern="2:8")
    with pytest.raises(RecipeError, match="0 < N < M"):
        obs(w, h, pattern="5:4")
    with pytest.raises(RecipeError, match=r"\[0, 1\)"):
        obs(w, h, 1.0)
    with pytest.raises(CalibrationError):
        obs(w, h * float("inf"))

"""Quantization grids, round-to-nearest, GPTQ and joint SparseGPT + quantization (seed 000/001):
every quantized weight is a level of its group, zero stays zero, N:M kept, GPTQ beats RTN."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.prune.int_format import pack_codes, unpack_codes
from sparsecc.errors import RecipeError
from sparsecc.prune import gptq, rtn, sparsegpt
from sparsecc.prune.hessian_error import reconstruction_error



def correlated(rows, cols, seed):
    """W and H = X^T X with X = Z A, A = I + a random rank-4 mix: H is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(cols, dtype=torch.float64) + torch.randn(cols, 4, generator=g, dtype=torch.float64) @ \
        torch.randn(4, cols, generator=g, dtype=torch.float64)
    x = (torch.randn(4 * cols, cols, generator=g, dtype=torch.float64) @ a).float()
    return torch.randn(rows, cols, generator=g), x.T @ x, x


def on_grid(w: torch.Tensor, grid) -> None:
    """w equals scale * (code - zero) with integer codes in [0, 2^b - 1], per group."""
    codes = grid.unpacked()
    assert int(codes.max()) <= 2 ** grid.bits - 1
    rows, cols = w.shape
    g = grid.group_size
    level = (w.double().reshape(rows, cols // g, g) / grid.scales.double()[..., None]) + grid.zeros.double()[..., None]
    torch.testing.assert_close(level, codes.double().reshape(rows, cols // g, g), atol=1e-4, rtol=0)
    torch.testing.assert_close(w.float(), grid.dequantize(), atol=0, rtol=0)


@given(st.integers(1, 6), st.sampled_from([1, 2, 3, 8, 9]), st.sampled_from([2, 3, 4, 8]))
@settings(max_examples=30, deadline=None)
def test_codes_pack_round_trip(rows, cols, bits):
    codes = torch.randint(0, 2 ** bits, (rows, cols), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape[1] == ((cols + 1) // 2 if bits <= 4 else cols)
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,sym", [(16, False), (None, False), (32, True)])
def test_rtn_levels_and_zeros(bits, group, sym):
    w = torch.randn(8, 64)
    w[:, :5] = 0  # pruned weights stay exactly zero: zero is a level
    new, grid = rtn(w, bits, group, sym)
    on_grid(new, grid)
    assert (new[:, :5] == 0).all()
    # round to nearest: no weight moves by more than half a step (within the clamp range)
    g = grid.group_size
    step = grid.scales.repeat_interleave(g, dim=1)
    assert ((new - w).abs() <= step / 2 + 1e-6).all()
    if sym:
        assert (grid.zeros == 2 ** (bits - 1)).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_round_to_nearest(bits):
    """GPTQ's error feedback lowers ||(W - Q)X||^2 well below RTN's on correlated inputs."""
    w, h, _ = correlated(32, 128, seed=1)
    r, _ = rtn(w, bits, 32)
    q, grid = gptq(w, h, bits, 32)
    on_grid(q, grid)
    assert reconstruction_error(w, q, h) < 0.8 * reconstruction_error(w, r, h)


def test_gptq_group_wider_than_block_and_odd_blocks():
    """Groups spanning lazy blocks (g=64, B=16) and blocks not a multiple of the group (B=24, g=16):
    the grids are still exact and the result stays close to the default blocking's."""
    w, h, _ = correlated(16, 96, seed=2)
    base, _ = gptq(w, h, 4, 32)
    for g, b in ((96, 16), (16, 24), (32, 128)):
        q, grid = gptq(w, h, 4, g, blocksize=b)
        on_grid(q, grid)
        assert reconstruction_error(w, q, h) < 2 * reconstruction_error(w, base, h) + 1e-9


@pytest.mark.parametrize("pattern,sparsity", [(None, 0.5), ("2:4", 0.0), ("4:8", 0.0)])
def test_joint_prune_and_quantize(pattern, sparsity):
    w, h, _ = correlated(32, 128, seed=3)
    new, keep, grid = sparsegpt(w, h, sparsity, pattern, bits=4, group_size=32)
    on_grid(new, grid)
    assert (new[~keep] == 0).all()
    if pattern:
        n, m = map(int, pattern.split(":"))
        assert ((keep.reshape(32, -1, m)).sum(-1) == n).all()
    else:
        assert abs((~keep).float().mean().item() - 0.5) < 0.01
    # joint costs little over pruning alone at 4 bits (measured 0.8-1.25x here), far less than
    # pruning then rounding to nearest (2-4x); at 8 bits nothing
    pruned, _ = sparsegpt(w, h, sparsity, pattern)
    then_rtn, _ = rtn(pruned, 4, 32)
    e_joint, e_prune = reconstruction_error(w, new, h), reconstruction_error(w, pruned, h)
    assert e_joint < 1.5 * e_prune
    assert e_joint < 0.6 * reconstruction_error(w, then_rtn, h)
    eight, _, _ = sparsegpt(w, h, sparsity, pattern, bits=8, group_size=32)
    assert reconstruction_error(w, eight, h) < 1.1 * e_prune


def test_joint_grid_is_mask_aware():
    """A group's scale is taken from its kept weights: a huge pruned weight does not widen the grid."""
    w, h, _ = correlated(4, 64, seed=4)
    w[0, 3] = 1e3  # the largest weight by far, but its input is dead: SparseGPT zeroes dead inputs
    h[3, :] = 0
    h[:, 3] = 0
    new, keep, grid = sparsegpt(w, h, 0.5, bits=4, group_size=64)
    assert new[0, 3] == 0 and grid.scales[0, 0] < 1.0


@pytest.mark.parametrize("kw,match", [(dict(bits=5), "bits must be one of 2, 3, 4, 8"),
                                      (dict(bits=4, group_size=48), "group_size 48 does not divide"),
                                      (dict(bits=4, group_size=0), "positive int or None"),
                                      (dict(bits=True), "bits must be")])
def test_bad_quantization_arguments(kw, match):
    w, h, _ = correlated(4, 64, seed=5)
    with pytest.raises(RecipeError, match=match):
        sparsegpt(w, h, 0.5, **kw)
    with pytest.raises(RecipeError, match=match):
        rtn(w, **{"bits": 4, **kw})

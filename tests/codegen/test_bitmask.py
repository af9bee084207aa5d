"""Bit-packed masks: round trips, the documented bit order, shapes and bad input."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.codegen.bitmask import pack_bits, packed_cols, unpack_bits


@given(st.integers(0, 6), st.integers(0, 40), st.integers(0, 2 ** 16), st.floats(0, 1))
def test_round_trip(rows, cols, seed, density):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < density
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and list(packed.shape) == [rows, (cols + 7) // 8]
    assert torch.equal(unpack_bits(packed, cols), mask)
    # row-major, little-endian within each byte, each row padded with zero bits: numpy's packbits
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=1, bitorder="little"))


def test_bit_order_is_little_endian():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 9] = mask[1, 3] = True
    assert pack_bits(mask).tolist() == [[0b00000001, 0b00000010], [0b00001000, 0]]
    assert packed_cols(10) == 2 and packed_cols(16) == 2 and packed_cols(0) == 0


def test_padding_bits_are_ignored_when_unpacking():
    packed = torch.tensor([[0xFF, 0xFF]], dtype=torch.uint8)
    assert unpack_bits(packed, 10).tolist() == [[True] * 10]


@pytest.mark.parametrize("packed, cols", [
    (torch.zeros(2, 2, dtype=torch.int32), 10),  # not uint8
    (torch.zeros(2, 3, dtype=torch.uint8), 10),  # too wide
    (torch.zeros(2, dtype=torch.uint8), 8),       # not 2-D
])
def test_unpack_refuses_bad_input(packed, cols):
    with pytest.raises(sparsecc.PlanError, match=f"bit-packed mask of {cols} columns must be uint8"):
        unpack_bits(packed, cols)


def test_pack_refuses_other_ranks():
    with pytest.raises(sparsecc.PlanError, match="2-D"):
        pack_bits(torch.ones(2, 3, 4, dtype=torch.bool))


def test_one_bit_per_entry():
    mask = torch.rand(64, 256) < 0.5
    assert pack_bits(mask).numel() * 8 == mask.numel()

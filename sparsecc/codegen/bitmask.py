"""Bool masks stored as bits: 8 mask entries per byte.

A mask [rows, cols] becomes uint8 [rows, ceil(cols / 8)], row-major, each row padded to a whole
byte with zero bits. Bit order is little-endian within a byte: bit j (value 1 << j) of byte k in
row r holds mask[r, 8k + j] (numpy's `packbits(..., bitorder="little")`).
"""
from __future__ import annotations

import torch

from ..errors import PlanError


def packed_cols(cols: int) -> int:
    return (cols + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)] (little-endian bits, rows padded with 0)."""
    if mask.dim() != 2:
        raise PlanError(f"pack_bits expects a 2-D mask, got shape {list(mask.shape)}")
    rows, cols = mask.shape
    x = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-cols) % 8)).reshape(rows, packed_cols(cols), 8)
    out = torch.zeros(rows, x.shape[1], dtype=torch.uint8, device=mask.device)
    for j in range(8):  # one byte-sized temporary at a time (a sum over shifted bits would widen to int64)
        out |= x[..., j] << j
    return out


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols/8)] -> bool [rows, cols]; the padding bits are ignored."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_cols(cols):
        raise PlanError(f"a bit-packed mask of {cols} columns must be uint8 [rows, {packed_cols(cols)}], got "
                        f"{packed.dtype} {list(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], 8 * packed.shape[1])[:, :cols].bool()

"""Weight-only integer storage: b-bit codes per weight, a scale and an integer zero point per group
(a pure tensor layout: the grids of prune/quantize.py, the kernels of codegen/quant_linear.py).

A weight W [out, in] quantized with `bits` b and groups of g consecutive inputs (g divides in)
is stored as
    codes   uint8 [out, in]   each in 0 .. 2^b - 1, packed: for b <= 4 two per byte (column 2c in
                              the low nibble, 2c+1 in the high one) -> [out, ceil(in/2)]; for b = 8
                              one per byte -> [out, in]
    scales  float32 [out, in/g]
    zeros   uint8 [out, in/g]  integer zero points, in 0 .. 2^b - 1
and W[r, k] = scales[r, k // g] * (codes[r, k] - zeros[r, k // g]) (seed 000's Q(w), GPTQ's grid).
The zero point is a level of the grid, so a pruned weight (code = zero point) is exactly 0.
"""
from __future__ import annotations

import torch

from ..errors import PlanError

BITS = (2, 3, 4, 8)


def packed_width(bits: int, cols: int) -> int:
    return (cols + 1) // 2 if bits <= 4 else cols


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [out, in] -> their stored form (two per byte for bits <= 4)."""
    codes = codes.to(torch.uint8)
    if bits > 4:
        return codes.contiguous()
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The stored form -> uint8 codes [out, cols]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_width(bits, cols):
        raise PlanError(f"{bits}-bit codes of {cols} columns must be uint8 [out, {packed_width(bits, cols)}], got "
                        f"{packed.dtype} {list(packed.shape)}")
    if bits > 4:
        return packed
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :cols]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """W = scale * (code - zero) per group, in float32, from unpacked codes [out, in]."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    if scales.shape != zeros.shape or scales.shape[0] != rows or groups < 1 or cols % groups:
        raise PlanError(f"scales {list(scales.shape)} and zeros {list(zeros.shape)} do not fit codes [{rows}, {cols}] "
                        "(one per group of the input width)")
    q = codes.reshape(rows, groups, cols // groups).float() - zeros.float()[..., None]
    return (q * scales.float()[..., None]).reshape(rows, cols)

"""Weight quantization grids: asymmetric or symmetric b-bit levels per group of inputs (seed 000 Q(w)).

For a group x of g weights (GPTQ's min-max grid, zero always a level):
    x_min = min(min x, 0), x_max = max(max x, 0)       sym: x_max = max(|x_min|, x_max), x_min = -x_max
    scale = (x_max - x_min) / (2^b - 1)                (a group of zeros: scale from [-1, 1])
    zero  = round(-x_min / scale)                      sym: zero = 2^(b-1)
    Q(x)  = scale * (clamp(round(x / scale) + zero, 0, 2^b - 1) - zero)

`rtn` rounds every weight to the nearest level (the baseline); `sparsecc.prune.sparsegpt(..., bits=)`
quantizes inside the OBS sweep (GPTQ; joint with pruning). Both return the dequantized weight and a
`QuantGrid` holding the codes, which `pack_` and compressed checkpoints store
(`sparsecc.prune.int_format`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .int_format import BITS, dequantize, pack_codes, unpack_codes
from ..errors import RecipeError


def check_quant(bits, group_size, cols: int | None = None, name: str = "weight") -> int:
    """Validate bits and group_size (None: one group per row); returns the group width for `cols` inputs."""
    if bits not in BITS or isinstance(bits, bool):
        raise RecipeError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise RecipeError(f"group_size must be a positive int or None (one group per output row), got {group_size!r}")
    if cols is None:
        return group_size or 0
    g = cols if group_size is None else group_size
    if cols % g:
        raise RecipeError(f"{name}: group_size {g} does not divide its input width {cols} (use a divisor of "
                          f"{cols}, e.g. {max(d for d in (32, 64, 128, cols) if cols % d == 0)}, or None)")
    return g


def grid_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of each row of x [rows, g] (the module docstring's grid); zero is a float integer."""
    maxq = 2 ** bits - 1
    lo = x.min(dim=1).values.clamp(max=0)
    hi = x.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes clamp(round(x / scale) + zero, 0, 2^b - 1) of x [rows, ...] with per-row scale and zero (float)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.clamp(torch.round(x / scale.reshape(shape)) + zero.reshape(shape), 0, 2 ** bits - 1)


@dataclass
class QuantGrid:
    """A quantized weight [out, in]: `bits`, group width `group_size`, `sym`, and its stored form
    (`codes` packed, `scales` float32 [out, in/g], `zeros` uint8 [out, in/g]; see prune/int_format)."""

    bits: int
    group_size: int
    sym: bool
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    in_features: int

    def unpacked(self) -> torch.Tensor:
        return unpack_codes(self.codes, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The weight this grid stores, float32 [out, in]."""
        return dequantize(self.unpacked(), self.scales, self.zeros)

    def to(self, device) -> "QuantGrid":
        return QuantGrid(self.bits, self.group_size, self.sym, self.codes.to(device), self.scales.to(device),
                         self.zeros.to(device), self.in_features)

    @property
    def form(self) -> str:
        """"int4 g128", "int8 row": bits and group width (pack_'s name for the stored form)."""
        return f"int{self.bits} {'row' if self.group_size == self.in_features else f'g{self.group_size}'}"

    def describe(self) -> str:
        return self.form + (" sym" if self.sym else "")

    def matches(self, weight: torch.Tensor) -> bool:
        """Whether `weight` [out, in] is still exactly this grid's values in its dtype (the quantizing
        configs copy grid.dequantize() into it; any later change breaks the match)."""
        if (self.codes.shape[0], self.in_features) != tuple(weight.shape):
            return False
        return torch.equal(self.to(weight.device).dequantize().to(weight.dtype), weight.detach())


def make_grid(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
              sym: bool) -> QuantGrid:
    """A QuantGrid from unpacked float/int codes [out, in] and per-group scale/zero [out, in/g]."""
    return QuantGrid(bits, group_size, sym, pack_codes(codes.to(torch.uint8), bits), scales.float().contiguous(),
                     zeros.to(torch.uint8).contiguous(), codes.shape[1])


def rtn(weight: torch.Tensor, bits: int = 4, group_size: int | None = 128, sym: bool = False,
        name: str = "weight") -> tuple[torch.Tensor, QuantGrid]:
    """Round-to-nearest quantization of `weight` [out, in] -> (dequantized weight in its dtype, grid).
    Zeros stay exactly zero (zero is a level), so a pruned weight keeps its mask."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise RecipeError(f"{name}: quantization expects a 2-D floating-point weight, got {weight.dtype} "
                          f"{tuple(weight.shape)}")
    rows, cols = weight.shape
    g = check_quant(bits, group_size, cols, name)
    w = weight.detach().float().reshape(rows * (cols // g), g)
    scale, zero = grid_params(w, bits, sym)
    q = quantize_codes(w, scale, zero, bits)
    scales, zeros = scale.reshape(rows, cols // g), zero.reshape(rows, cols // g)
    grid = make_grid(q.reshape(rows, cols), scales, zeros, bits, g, sym)
    return grid.dequantize().to(weight.dtype), grid


#: attribute (in the module's __dict__) holding the QuantGrid of a quantized linear's weight
QUANTIZED = "sparsecc_quant"


def grid_of(module) -> QuantGrid | None:
    """The QuantGrid of a quantized module's weight (None: not quantized)."""
    return module.__dict__.get(QUANTIZED)

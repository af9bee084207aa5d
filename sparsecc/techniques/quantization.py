"""Weight-only quantization configs: GPTQ (OBS for quantization, seed 000) and round-to-nearest.

    sparsecc.sparsify_(model, {"re:.*layers.*": sparsecc.GPTQConfig(bits=4, group_size=128)}, batches)
    sparsecc.sparsify_(model, {"re:.*layers.*": sparsecc.SparseGPTConfig(0.5, bits=4)}, batches)  # joint
    sparsecc.pack_(model)   # quantized linears -> QuantLinear where a fast int4/int8 product exists

A quantized linear keeps the dequantized weight (so the model runs, saves and loads as before)
and its grid (`prune.quantize.QuantGrid`: codes, scales, zero points) in
`module.__dict__[QUANTIZED]`, from which `pack_` and compressed checkpoints store it. A layer is
quantized once and never pruned after: its weight must stay on its grid (prune and quantize in
one pass with SparseGPTConfig(bits=...)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RecipeError
from ..prune.quantize import QUANTIZED, QuantGrid, check_quant, grid_of, rtn
from ..prune.sparsegpt import gptq
from .configs import SparsityConfig, Technique, register_technique


@dataclass(frozen=True)
class QuantFields:
    """Fields shared by the quantizing configs: `bits` (2, 3, 4 or 8), per-group scales and zero
    points over `group_size` consecutive inputs (None: one group per output row), symmetric grid
    when `sym`."""

    bits: int = 4
    group_size: int | None = 128
    sym: bool = False

    def check_quant_fields(self) -> None:
        check_quant(self.bits, self.group_size)
        if not isinstance(self.sym, bool):
            raise RecipeError(f"sym must be True or False, got {self.sym!r}")


@dataclass(frozen=True)
class RTNConfig(QuantFields, SparsityConfig):
    """Round-to-nearest weight quantization: the data-free baseline."""

    def validate(self) -> None:
        self.check_quant_fields()


@dataclass(frozen=True)
class GPTQConfig(QuantFields, SparsityConfig):
    """GPTQ: quantize column by column in SparseGPT's sweep, each rounding error compensated on the
    columns not yet quantized through H^-1 (lazy blocks of `blocksize`, damping `damp`·mean(diag H))."""

    blocksize: int = 128
    damp: float = 0.01

    def validate(self) -> None:
        self.check_quant_fields()
        if self.blocksize < 1:
            raise RecipeError(f"blocksize must be positive, got {self.blocksize}")
        if not 0 <= self.damp < 1:
            raise RecipeError(f"damp must be in [0, 1), got {self.damp}")


def check_quantizable(model, name: str, config, in_features: int) -> None:
    """Before any work: refuse rewriting the weight of a linear already quantized (it would leave its
    grid), and a quantizing config whose group size does not divide the layer's input width."""
    try:
        grid = grid_of(model.get_submodule(name))
    except AttributeError:
        grid = None
    if grid is not None:
        raise RecipeError(f"{name} is already quantized ({grid.describe()}); a layer is quantized once: load the "
                          "model again, or prune and quantize in one pass with SparseGPTConfig(bits=...)")
    if getattr(config, "bits", None) is not None:
        check_quant(config.bits, config.group_size, in_features, name)


def check_no_grids(model, name: str, what: str) -> None:
    """Refuse a rewrite that rebuilds the linears of module `name` when one of them is quantized."""
    hit = next((n for n, m in model.get_submodule(name).named_modules() if grid_of(m) is not None), None)
    if hit is not None:
        raise RecipeError(f"{what} would rebuild {name}.{hit}, which is quantized: rewrite the module first and "
                          "quantize the result in a later call (or load the model again)")


def grid_decision(grid: QuantGrid) -> dict[str, torch.Tensor]:
    """A QuantGrid as decision tensors (Plans store decisions; `attach_grid` rebuilds it)."""
    return {"codes": grid.codes, "scales": grid.scales, "zeros": grid.zeros}


def attach_grid(config, model, site, decision: dict, tx=None) -> QuantGrid | None:
    """Put the decision's grid on the site's module (undone with `tx`); None when nothing was quantized."""
    if "codes" not in decision:
        return None
    g = site.in_features if config.group_size is None else config.group_size
    grid = QuantGrid(config.bits, g, config.sym, decision["codes"], decision["scales"], decision["zeros"],
                     site.in_features)
    module = model.get_submodule(site.name)
    if tx is not None:
        tx.on_undo(lambda: module.__dict__.pop(QUANTIZED, None))
    module.__dict__[QUANTIZED] = grid.to(site.weight(model).device)
    return grid


class _Quantizing(Technique):
    """Apply: copy the dequantized weight, then attach its grid."""

    def compile_error(self, config):
        return (f"{type(config).__name__} rewrites the weights into their quantized values, while the compile "
                "backend only masks weights")

    def apply(self, config, model, site, decision, tx=None):
        super().apply(config, model, site, decision, tx)
        attach_grid(config, model, site, decision, tx)


@register_technique(RTNConfig)
class RTN(_Quantizing):
    requires = ()

    def plan(self, config, site, weight, stats):
        new, grid = rtn(weight, config.bits, config.group_size, config.sym, name=site.name)
        return {"weight": new, **grid_decision(grid)}


@register_technique(GPTQConfig)
class GPTQ(_Quantizing):
    requires = ("hessian",)

    def plan(self, config, site, weight, stats):
        new, grid = gptq(weight, stats["hessian"].matrix().to(weight.device), config.bits, config.group_size,
                         config.sym, blocksize=config.blocksize, damp=config.damp, name=site.name)
        return {"weight": new, **grid_decision(grid)}

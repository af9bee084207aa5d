"""The weights fine-tuning trains, and how each keeps its pruned (or quantized) form.

Every linear's weight W is reparameterised for the run (`torch.nn.utils.parametrize`), so the
model computes with exactly the weight it will end with:

    W_used = Q(W + s·B A) ⊙ M

- M, the keep-mask, is W ≠ 0 when the run starts: a pruned weight's gradient is M-masked, so
  its optimizer state stays zero, it never moves, and W_used is exactly zero there (N:M groups
  keep their pattern, since no zero ever becomes nonzero). A quantized weight at the grid's level 0
  counts as pruned too: the model does not say which zeros pruning made.
- s·B A is LoRA's low-rank update (seed 000 / Hu et al. 2021: A random, B zero, s = alpha/rank),
  for method="lora" only; W is then frozen. Merging writes W_used into the weight.
- Q rounds onto the linear's quantization grid (`prune.quantize.QuantGrid`: scales and zero
  points fixed, only the codes change), with the straight-through gradient dQ/dW = 1, for a
  linear that `sparsify_` quantized. A zero stays a zero (zero is a level of every grid).

`attach` puts the reparameterisation on; `merge` takes it off, leaving W_used (and a quantized
linear's grid holding its new codes); `detach_all` takes it off after a failure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..prune.masks import zero_share
from ..prune.quantize import QUANTIZED, QuantGrid, grid_of, make_grid, quantize_codes
from ..techniques.rewrites import REWRITTEN

PRUNED_SHARE = 0.01  # a linear with at least this share of exact zeros counts as pruned


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2; weight stored [in, out])."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def out_in(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """The weight viewed [out, in] (Conv1D stores it transposed)."""
    return out_in_t(w, not isinstance(module, nn.Linear))


@dataclass
class Target:
    """One linear the run reparameterises: its keep-mask (None: dense), its grid (None: not
    quantized), and whether LoRA adapts it."""
    name: str
    module: nn.Module
    mask: torch.Tensor | None
    grid: QuantGrid | None
    lora: bool
    order: tuple = ()          # the module's parameter names in order (parametrize moves `weight` last)
    requires_grad: bool = True  # the weight's flag before the run

    @property
    def pruned(self) -> bool:
        return self.mask is not None and float((~self.mask).float().mean()) >= PRUNED_SHARE


def find_targets(model: nn.Module, lora: bool) -> list[Target]:
    """Every linear but the output embedding (lm_head), with the mask of its zeros (when it has
    any) and its grid. Linears of a module rewritten into a form that bypasses them are not
    listed separately: CATS and MoE read their linears' weights, which are still parameters."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, m in model.named_modules():
        if not is_linear(m) or m is head or parametrize.is_parametrized(m, "weight"):
            continue
        w = m.weight.detach()
        zeros = w == 0
        mask = ~zeros if bool(zeros.any()) else None
        out.append(Target(name, m, mask, grid_of(m), lora, tuple(m._parameters), m.weight.requires_grad))
    return out


def packed(model: nn.Module) -> str | None:
    """The name of a linear `pack_` / `compress_*` replaced (its weights are no longer trainable
    tensors), if any."""
    from ..techniques.packing import CSRLinear, NMLinear, QuantLinear

    return next((n for n, m in model.named_modules() if isinstance(m, (NMLinear, CSRLinear, QuantLinear))), None)


def other_masks(model: nn.Module, targets: list[Target]) -> dict[str, torch.Tensor]:
    """{name: keep-mask} of the pruned parameters the targets leave out (lm_head, embeddings, an
    MoE's expert tensors): at least 2-D, >= 1% exact zeros. A full run masks their gradients
    (`mask_gradients`): with a zero gradient AdamW's moments and update stay zero, so they stay zero."""
    skip = {id(t.module.weight) for t in targets}
    out = {}
    for name, p in model.named_parameters():
        if p.dim() >= 2 and id(p) not in skip and zero_share(p.detach()) >= PRUNED_SHARE:
            out[name] = p.detach() != 0
    return out


def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Hooks zeroing the pruned entries of each masked parameter's gradient; remove them after the run."""
    params = dict(model.named_parameters())
    return [params[n].register_hook(lambda g, m=m: g * m.to(g.dtype)) for n, m in masks.items()]


def pruned_summary(model: nn.Module, targets: list[Target], others: dict) -> dict:
    """How the model was pruned, as far as its modules show it: {"masked": linears (and other
    tensors) with >= 1% zeros, "quantized": linears with a grid, "rewritten": modules a sparsecc
    rewrite replaced or shrank}."""
    return {"masked": sum(t.pruned for t in targets) + len(others), "quantized": sum(t.grid is not None for t in targets),
            "rewritten": sum(REWRITTEN in m.__dict__ for m in model.modules())}


class _RoundToGrid(torch.autograd.Function):
    """Q(W) on fixed scales / zero points forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, w, scales, zeros, bits, group):
        return on_grid(w, scales, zeros, bits, group)[0]

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def on_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int):
    """(Q(w) in w's dtype, codes) of w [out, in] on the grid's per-group scales / zero points
    (prune/quantize.py's Q with the grid held fixed)."""
    rows, cols = w.shape
    x = w.detach().float().reshape(rows * (cols // group), group)
    s, z = scales.reshape(-1).to(x.device), zeros.reshape(-1).float().to(x.device)
    q = quantize_codes(x, s, z, bits)
    return ((q - z[:, None]) * s[:, None]).reshape(rows, cols).to(w.dtype), q.reshape(rows, cols)


class TrainedWeight(nn.Module):
    """The parametrization W -> Q(W + s·B A) ⊙ M of one linear's weight (module docstring)."""

    def __init__(self, target: Target, rank: int, alpha: float, generator: torch.Generator | None):
        super().__init__()
        w = target.module.weight
        self.transposed = not isinstance(target.module, nn.Linear)
        self.register_buffer("mask", None if target.mask is None else target.mask.to(w.dtype), persistent=False)
        self.grid = target.grid
        self.requires_grad = target.requires_grad  # restored on the merged weight
        if target.lora:
            out_f, in_f = out_in(target.module, w).shape
            # A ~ N(0, 1/in): the update's first factor random, its second zero, so training starts at W
            a = torch.randn(rank, in_f, generator=generator, dtype=torch.float32) / math.sqrt(in_f)
            self.A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
            self.B = nn.Parameter(torch.zeros(out_f, rank, device=w.device, dtype=w.dtype))
            self.scale = alpha / rank
        else:
            self.A = self.B = None

    def delta(self) -> torch.Tensor:
        d = self.scale * (self.B @ self.A)
        return d.t() if self.transposed else d

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.A is not None:
            w = w + self.delta()
        if self.grid is not None:
            g = self.grid
            w = out_in_t(_RoundToGrid.apply(out_in_t(w, self.transposed), g.scales, g.zeros, g.bits, g.group_size),
                         self.transposed)
        return w if self.mask is None else w * self.mask


def out_in_t(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """w [out, in] from its stored layout, or back (a transpose is its own inverse)."""
    return w.t() if transposed else w


def attach(targets: list[Target], rank: int, alpha: float, seed: int) -> list[nn.Parameter]:
    """Reparameterise every target's weight; return the parameters to train for them (each
    weight, or the LoRA factors A, B with the weight frozen), in `targets` order."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for t in targets:
        if t.mask is None and t.grid is None and not t.lora:
            params.append(t.module.weight)  # a dense weight of a full run: trained as it is
            continue
        p = TrainedWeight(t, rank, alpha, gen)
        parametrize.register_parametrization(t.module, "weight", p, unsafe=True)
        original = t.module.parametrizations.weight.original
        if t.lora:
            original.requires_grad_(False)
            params += [p.A, p.B]
        else:
            params.append(original)
    return params


def merge(targets: list[Target]) -> None:
    """Write each reparameterised weight's W_used into the weight and take the reparameterisation
    off; a quantized linear's weight is rounded exactly onto its grid, whose codes are replaced."""
    for t in targets:
        if not parametrize.is_parametrized(t.module, "weight"):
            continue
        p = t.module.parametrizations.weight[0]
        with torch.no_grad():
            parametrize.remove_parametrizations(t.module, "weight", leave_parametrized=True)
            if p.grid is not None:  # the straight-through sum W + (Q(W) - W) can miss Q(W) by an ulp
                w = out_in(t.module, t.module.weight)
                value, codes = on_grid(w, p.grid.scales, p.grid.zeros, p.grid.bits, p.grid.group_size)
                if p.mask is not None:
                    value = value * out_in(t.module, p.mask)
                w.copy_(value)
                t.module.__dict__[QUANTIZED] = make_grid(codes, p.grid.scales, p.grid.zeros, p.grid.bits,
                                                         p.grid.group_size, p.grid.sym)
        _settle(t.module, t.order, p.requires_grad)


def detach_all(targets: list[Target]) -> None:
    """Take every reparameterisation off, leaving the trained tensors (the caller copies back the
    parameters it saved before the run) and the grids the linears had."""
    for t in targets:
        if parametrize.is_parametrized(t.module, "weight"):
            parametrize.remove_parametrizations(t.module, "weight", leave_parametrized=False)
        _settle(t.module, t.order, t.requires_grad)
        if t.grid is not None:
            t.module.__dict__[QUANTIZED] = t.grid


def _settle(module: nn.Module, order: tuple, requires_grad: bool) -> None:
    """After the reparameterisation is off: the weight's gradient flag as it was, and the module's
    parameters in their order (parametrize re-adds `weight` last; state dicts and fingerprints keep order)."""
    module.weight.requires_grad_(requires_grad)
    params = module._parameters
    if order and set(order) == set(params):
        kept = {k: params[k] for k in order}
        params.clear()
        params.update(kept)


def adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear whose weight still carries an unmerged LoRA adapter."""
    return [(n, m) for n, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], TrainedWeight)
            and m.parametrizations.weight[0].A is not None]

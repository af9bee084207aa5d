"""Weight-pruning configs and their techniques: magnitude, Wanda, SparseGPT, OBS.

Each config takes `sparsity` and `pattern` ("N:M" or None), optionally `layerwise="owl"`
(OWL's outlier-weighted per-block sparsity, seed 003 §4, allocated before pruning by
`passes/analysis/outliers.py`) and, with a pattern, `permute=True` (seed 000's channel permutation: input
columns are reordered so that more important weights survive the N:M mask, and the rows of the
linears feeding those columns are reordered to match, leaving the dense function unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .configs import SparsityConfig, Technique, register_technique
from ..errors import RecipeError
from ..prune import magnitude, obs, sparsegpt, wanda
from ..prune.masks import check_nm_width, check_sparsity, parse_pattern
from ..prune.permute import find_permutation, nm_retained
from .quantization import QuantFields, attach_grid, grid_decision


@dataclass(frozen=True)
class PruningConfig(SparsityConfig):
    """Fields shared by every pruning config (see the module docstring)."""

    sparsity: float = 0.5
    pattern: str | None = None
    layerwise: str | None = None
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    permute: bool = False

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        nm = parse_pattern(self.pattern)
        if self.layerwise not in (None, "owl"):
            raise RecipeError(f"layerwise must be None or 'owl', got {self.layerwise!r}")
        if self.layerwise == "owl" and nm is not None:
            raise RecipeError("layerwise='owl' allocates unstructured sparsity per block; drop pattern or layerwise")
        if self.owl_m <= 0 or not 0 <= self.owl_lambda < 1:
            raise RecipeError(f"OWL needs owl_m > 0 and owl_lambda in [0, 1), got {self.owl_m}, {self.owl_lambda}")
        if self.permute and nm is None:
            raise RecipeError("permute=True reorders channels for an N:M pattern; set pattern='2:4' (or another N:M)")


@dataclass(frozen=True)
class MagnitudeConfig(PruningConfig):
    """Keep the largest |W|; `group` "layer" compares the whole matrix, "output" each row."""

    group: str = "layer"

    def validate(self) -> None:
        super().validate()
        if self.group not in ("layer", "output"):
            raise RecipeError(f"MagnitudeConfig.group must be 'layer' or 'output', got {self.group!r}")


@dataclass(frozen=True)
class WandaConfig(PruningConfig):
    """Wanda: score |W_ij|·‖X_j‖₂, compared within each output row (seed 002)."""


@dataclass(frozen=True)
class SparseGPTConfig(PruningConfig):
    """SparseGPT Algorithm 1 (seed 000): OBS updates with lazy blocks of `blocksize` columns and
    adaptive masks every `mask_blocksize` columns (default: blocksize); damping `damp`·mean(diag H).
    With `bits` (2, 3, 4, 8) the kept weights are quantized in the same sweep (seed 001's joint
    sparsification and quantization), per `group_size` inputs (None: per row), `sym` grid or not."""

    blocksize: int = 128
    mask_blocksize: int | None = None
    damp: float = 0.01
    bits: int | None = None
    group_size: int | None = 128
    sym: bool = False

    def validate(self) -> None:
        super().validate()
        if self.bits is not None:
            QuantFields.check_quant_fields(self)
        if self.blocksize < 1 or (self.mask_blocksize is not None and self.mask_blocksize < 1):
            raise RecipeError("blocksize and mask_blocksize must be positive")
        if not 0 <= self.damp < 1:
            raise RecipeError(f"damp must be in [0, 1), got {self.damp}")


@dataclass(frozen=True)
class OBSConfig(PruningConfig):
    """Exact per-row OBS with iterative removal (seed 003), for layers small enough to afford it."""

    damp: float = 0.01

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.damp < 1:
            raise RecipeError(f"damp must be in [0, 1), got {self.damp}")


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Refuse a NaN/Inf weight: magnitude would keep it and the calibrated methods would spread it."""
    if not bool(torch.isfinite(weight).all()):
        raise RecipeError(f"{name}: its weight holds NaN/Inf, which no pruning method can rank; repair or "
                          f"reload the model, or skip the module with {{{name!r}: None}} in the recipe")


class _Pruning(Technique):
    """Shared plan/apply: optional channel permutation, then the metric's own selection."""

    def select(self, config, site, weight, stats) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # abstract

    def needs(self, config):
        """OWL's allocation is one more artefact (passes/analysis/outliers.py)."""
        return self.requires + (("layer_sparsity",) if config.layerwise == "owl" else ())

    def importance(self, weight, stats) -> torch.Tensor:
        """Scores used to choose a channel permutation (the metric's own when it has one)."""
        return weight.abs().float()

    def plan(self, config, site, weight, stats):
        nm = parse_pattern(config.pattern)
        if nm is not None:
            check_nm_width(nm, site.in_features, site.name)
        try:
            if not (config.permute and site.feeders):
                return self.select(config, site, weight, stats)
            scores = self.importance(weight, stats)
            perm = find_permutation(scores, *nm)
            decision = self.select(config, site, weight[:, perm], permute_stats(stats, perm))
            decision["perm"] = perm
            decision["retained_score"] = torch.tensor([nm_retained(scores, *nm), nm_retained(scores[:, perm], *nm)])
            return decision
        except RecipeError as e:
            raise RecipeError(f"{site.name}: {e}") from None

    def touches(self, config, site, decision):
        if "perm" not in decision:
            return [site.param]
        return [site.param] + [name for name, _ in site.feeders]

    def apply(self, config, model, site, decision, tx=None):
        if "perm" in decision:
            perm = decision["perm"].to(torch.long)
            for name, transposed in site.feeders:  # feeders' output channels follow the permutation
                t = model.get_parameter(name).data
                view = t.t() if transposed else t
                view.copy_(view[perm].clone())
            w = site.weight(model)
            w.copy_(w[:, perm].clone())
        super().apply(config, model, site, decision, tx)


def permute_stats(stats: dict, perm: torch.Tensor) -> dict:
    """Statistics of the permuted input: column j of the new input is column perm[j] of the old
    (each statistic that depends on the column order has a `permuted(perm)`)."""
    return {key: s.permuted(perm) if hasattr(s, "permuted") else s for key, s in stats.items()}


@register_technique(MagnitudeConfig)
class Magnitude(_Pruning):
    requires = ()

    def select(self, config, site, weight, stats):
        return {"mask": magnitude(weight, config.sparsity, config.pattern, config.group)}


@register_technique(WandaConfig)
class Wanda(_Pruning):
    requires = ("input_stats",)

    def importance(self, weight, stats):
        return weight.abs().float() * stats["input_stats"].l2.to(weight.device)[None, :]

    def select(self, config, site, weight, stats):
        return {"mask": wanda(weight, stats["input_stats"].l2.to(weight.device), config.sparsity, config.pattern)}


class _HessianPruning(_Pruning):
    requires = ("hessian",)

    def importance(self, weight, stats):
        # SparseGPT's saliency with a diagonal H: w^2 * H_jj (= Wanda's score squared)
        return weight.float() ** 2 * torch.diagonal(stats["hessian"].xtx).float().to(weight.device)[None, :]


@register_technique(SparseGPTConfig)
class SparseGPT(_HessianPruning):
    def select(self, config, site, weight, stats):
        out = sparsegpt(weight, stats["hessian"].matrix().to(weight.device), config.sparsity, config.pattern,
                        blocksize=config.blocksize, damp=config.damp, mask_blocksize=config.mask_blocksize,
                        name=site.name, bits=config.bits, group_size=config.group_size, sym=config.sym)
        decision = {"weight": out[0], "mask": out[1]}
        return decision if config.bits is None else decision | grid_decision(out[2])

    def apply(self, config, model, site, decision, tx=None):
        super().apply(config, model, site, decision, tx)
        attach_grid(config, model, site, decision, tx)


@register_technique(OBSConfig)
class OBS(_HessianPruning):
    def select(self, config, site, weight, stats):
        new, mask = obs(weight, stats["hessian"].matrix().to(weight.device), config.sparsity, config.pattern,
                        damp=config.damp, name=site.name)
        return {"weight": new, "mask": mask}

"""`MagnitudeConfig`: data-free magnitude pruning of linear weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configs import SparsityConfig, Technique, register_technique
from ..errors import RecipeError
from ..prune.magnitude import magnitude
from ..prune.masks import check_sparsity, parse_pattern


@dataclass(frozen=True)
class MagnitudeConfig(SparsityConfig):
    """Prune the smallest |W| entries.

    sparsity: fraction pruned, in [0, 1) (ignored when `pattern` is given).
    pattern: None (unstructured) or "N:M" (N kept in every M consecutive inputs).
    group: "layer" (compare the whole matrix) or "output" (compare within each row).
    """

    sparsity: float = 0.5
    pattern: str | None = None
    group: str = "layer"

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        parse_pattern(self.pattern)
        if self.group not in ("layer", "output"):
            raise RecipeError(f"MagnitudeConfig.group must be 'layer' or 'output', got {self.group!r}")


@register_technique(MagnitudeConfig)
class Magnitude(Technique):
    requires = ()

    def plan(self, config, site, weight, stats):
        try:
            mask = magnitude(weight, config.sparsity, config.pattern, config.group)
        except RecipeError as e:
            raise RecipeError(f"{site.name}: {e}") from None
        return {"mask": mask}

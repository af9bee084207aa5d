"""Per-linear input statistics: column L2 norms (Wanda's ‖X_j‖₂), mean |x|, max |x|, tokens.

Sums and maxima only, normalised when read, so statistics over batches equal statistics over
their concatenation (up to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import AnalysisPass


@dataclass
class InputStats:
    """Per input column j: ||X_j||_2 (Wanda's activation norm), mean |x|, max |x|; tokens seen."""

    sumsq: torch.Tensor    # [in] fp64, sum_t x_tj^2
    sum_abs: torch.Tensor  # [in] fp64
    max_abs: torch.Tensor  # [in] fp32
    count: int = 0

    @classmethod
    def empty(cls, in_features: int, device=None) -> "InputStats":
        z = torch.zeros(in_features, dtype=torch.float64, device=device)
        return cls(z, z.clone(), torch.zeros(in_features, dtype=torch.float32, device=device), 0)

    def update(self, x: torch.Tensor) -> None:  # x: [N, in]
        x64 = x.double()
        self.sumsq += (x64 * x64).sum(0)
        self.sum_abs += x64.abs().sum(0)
        self.max_abs = torch.maximum(self.max_abs, x.abs().amax(0).float())
        self.count += x.shape[0]

    @property
    def l2(self) -> torch.Tensor:
        return self.sumsq.sqrt().float()

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.sum_abs / max(self.count, 1)).float()

    def permuted(self, perm: torch.Tensor) -> "InputStats":
        """The statistics of the input with its columns reordered (column j <- column perm[j])."""
        return InputStats(self.sumsq[perm], self.sum_abs[perm], self.max_abs[perm], self.count)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sumsq": self.sumsq, "sum_abs": self.sum_abs, "max_abs": self.max_abs,
                "count": torch.tensor(self.count)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "InputStats":
        return cls(t["sumsq"], t["sum_abs"], t["max_abs"], int(t["count"]))


class CollectInputStats(AnalysisPass):
    name = "collect_input_stats"
    produces = ("input_stats",)

    def observe(self, ctx, site, x):
        table = ctx.stats.setdefault("input_stats", {})
        if site.name not in table:
            table[site.name] = InputStats.empty(site.in_features, x.device)
        table[site.name].update(x)

"""Per-linear H = Σ_t x_t x_tᵀ (SparseGPT's and OBS's Hessian), streamed over tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import AnalysisPass


@dataclass
class HessianStats:
    """H = sum_t x_t x_t^T over the tokens seen (fp32 by default, fp64 on request)."""

    xtx: torch.Tensor  # [in, in]
    count: int = 0

    @classmethod
    def empty(cls, in_features: int, dtype=torch.float32, device=None) -> "HessianStats":
        return cls(torch.zeros(in_features, in_features, dtype=dtype, device=device), 0)

    def update(self, x: torch.Tensor) -> None:  # x: [N, in]
        xd = x.to(self.xtx.dtype)
        self.xtx.addmm_(xd.t(), xd)
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """SparseGPT's scaling H = 2/n * X X^T (the Hessian of the layer's squared error / n)."""
        return self.xtx * (2.0 / max(self.count, 1))

    def permuted(self, perm: torch.Tensor) -> "HessianStats":
        return HessianStats(self.xtx[perm][:, perm], self.count)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"xtx": self.xtx, "count": torch.tensor(self.count)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "HessianStats":
        return cls(t["xtx"], int(t["count"]))


class CollectHessians(AnalysisPass):
    name = "collect_hessians"
    produces = ("hessian",)

    def __init__(self, modules=None, dtype: torch.dtype = torch.float32):
        super().__init__(modules)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype

    def observe(self, ctx, site, x):
        table = ctx.stats.setdefault("hessian", {})
        if site.name not in table:
            table[site.name] = HessianStats.empty(site.in_features, self.dtype, x.device)
        table[site.name].update(x)

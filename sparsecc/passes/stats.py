"""Streaming statistics of a linear layer's input X ([tokens, in]), accumulated batch by batch.

Accumulation is exact up to float rounding regardless of how tokens are split into batches:
sums and maxima only, normalised when read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prune.sparsegpt import dampen  # noqa: F401  (re-exported: SparseGPT's conditioning of H)


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

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sumsq": self.sumsq, "sum_abs": self.sum_abs, "max_abs": self.max_abs,
                "count": torch.tensor(self.count)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "InputStats":
        return cls(t["sumsq"], t["sum_abs"], t["max_abs"], int(t["count"]))


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

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"xtx": self.xtx, "count": torch.tensor(self.count)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "HessianStats":
        return cls(t["xtx"], int(t["count"]))


STAT_TYPES = {"input_stats": InputStats, "hessian": HessianStats}

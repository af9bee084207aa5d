"""Per-linear input statistics: column L2 norms (Wanda's ‖X_j‖₂), mean |x|, max |x|, tokens.

Sums and maxima only, normalised when read, so statistics over batches equal statistics over
their concatenation (up to float rounding). The sums are folded in global batch order once the
block was observed (batch_sums.py): the same bits in one process and over N ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import AnalysisPass
from .batch_sums import BatchSums


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

    def setup(self, ctx):
        super().setup(ctx)
        # per module, until its block is reduced: (Σx², Σ|x|) per batch, max |x|, tokens
        self._sums = BatchSums()
        self._max: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def observe(self, ctx, site, x):
        x64 = x.double()
        self._sums.add(site.name, ctx.global_batch, torch.stack([(x64 * x64).sum(0), x64.abs().sum(0)]))
        m = x.abs().amax(0).float()
        self._max[site.name] = torch.maximum(self._max[site.name], m) if site.name in self._max else m
        self._count[site.name] = self._count.get(site.name, 0) + x.shape[0]

    def reduce(self, ctx, names, comm):
        ctx.stats.setdefault("input_stats", {}).update(self.collected(ctx, names, comm))

    def collected(self, ctx, names, comm) -> dict[str, InputStats]:
        """The InputStats of modules `names` over every rank's batches (those no rank saw left out,
        as one process would have no entry)."""
        out = {}
        counts = comm.sum_exact_(torch.tensor([self._count.pop(n, 0) for n in names]))
        for name, count in zip(names, counts.tolist()):
            site = ctx.captured.sites[name]
            n, device = site.in_features, site.weight(ctx.model).device  # loaded by now (onloading)
            acc = self._sums.fold(name, (2, n), device, comm)
            m = self._max.pop(name, None)
            m = comm.max_(m if m is not None else torch.zeros(n, device=device))
            if count:  # |x| >= 0: zeros are neutral in the maximum; clones: no shared storage (Plans)
                out[name] = InputStats(acc[0].clone(), acc[1].clone(), m, count)
        return out

"""Statistics of the input h of the linear consuming a module's prunable units, for structured
pruning (techniques/structured.py): an MLP's intermediate channels h = act(x W_gateᵀ) * (x W_upᵀ)
(the input of down), or an attention module's heads side by side (the input of o):
Σh and Σh² per channel (fp64; mean, variance and ‖h_i‖₂ for the FLAP and Wanda-SP scores) and,
for `update="refit"`, H = Σ h hᵀ (the least-squares refit of W_down on the kept channels).
Folded over the batches (and ranks) once the block was observed: see `ChannelSums`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CalibrationError
from ...techniques.shrink import consumer
from ..base import AnalysisPass
from .batch_sums import BatchSums


@dataclass
class ChannelStats:
    sum: torch.Tensor      # [I] fp64
    sumsq: torch.Tensor    # [I] fp64
    xtx: torch.Tensor | None = None  # [I, I] fp64 (sums of fp32 partials), or None
    count: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance of each channel over the calibration tokens (FLAP's fluctuation)."""
        n = max(self.count, 2)
        return ((self.sumsq - self.sum * self.sum / n) / (n - 1)).clamp_min(0)

    @property
    def l2(self) -> torch.Tensor:
        return self.sumsq.sqrt()


class ChannelSums:
    """Collects ChannelStats per module, the same bits in one process and over N ranks: Σh, Σh²
    folded in global batch order (batch_sums.py), H as fp32 partials summed in fp64 (exact in any
    order, analysis/hessian.py) and all-reduced."""

    def __init__(self):
        self.sums = BatchSums()
        self.xtx: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, batch: int, h: torch.Tensor, xtx: bool) -> None:  # h: [N, I]
        h64 = h.double()
        self.sums.add(name, batch, torch.stack([h64.sum(0), (h64 * h64).sum(0)]))
        if xtx:
            if name not in self.xtx:
                self.xtx[name] = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64, device=h.device)
            self.xtx[name] += (h.float().t() @ h.float()).double()
        self.count[name] = self.count.get(name, 0) + h.shape[0]

    def reduce(self, name: str, width: int, device, comm, xtx: bool) -> ChannelStats | None:
        """Module `name`'s statistics over every rank's batches (None if no rank saw it). A
        collective: every rank calls it for the same names in the same order."""
        count = int(comm.sum_exact_(torch.tensor([self.count.pop(name, 0)], dtype=torch.int64)))
        acc = self.sums.fold(name, (2, width), device, comm)
        h = None
        if xtx:
            h = self.xtx.pop(name, None)
            h = comm.sum_exact_(h if h is not None else torch.zeros(width, width, dtype=torch.float64, device=device))
        return ChannelStats(acc[0].clone(), acc[1].clone(), h, count) if count else None


def consumer_width(ctx, name: str) -> tuple[int, torch.device]:
    """(input features, device) of the consumer linear `name` (loaded by now, under onloading)."""
    w = ctx.model.get_submodule(name).weight
    return w.shape[-1], w.device


class CollectChannelStats(AnalysisPass):
    name = "collect_channel_stats"
    produces = ("channel_stats",)
    after = ("module_forms", "weights")  # on the block's pruned weights

    def __init__(self, mlps: dict):
        super().__init__(modules=[])
        self.mlps = dict(mlps)  # {module name: (its spec, whether H is wanted)}
        self._downs: dict[str, str] = {}

    @classmethod
    def from_targets(cls, targets):
        return cls({name: (spec, cfg.update == "refit") for name, (cfg, spec) in targets.items()})

    def setup(self, ctx):
        super().setup(ctx)
        self._sums = ChannelSums()

    def hooked_modules(self, ctx):
        self._downs = {f"{name}.{consumer(spec)}": name for name, (spec, _) in self.mlps.items()}
        return list(self._downs)

    def observe_module(self, ctx, name, x, y):
        mlp = self._downs[name]
        if not torch.isfinite(x).all():
            raise CalibrationError(f"NaN/Inf in the input of {name}: check the calibration "
                                   "batches and the model's dtype")
        self._sums.add(mlp, ctx.global_batch, x, self.mlps[mlp][1])

    def reduce(self, ctx, names, comm):
        table = ctx.stats.setdefault("channel_stats", {})
        for name in names:
            mlp = self._downs[name]
            stats = self._sums.reduce(mlp, *consumer_width(ctx, name), comm, self.mlps[mlp][1])
            if stats is not None:
                table[mlp] = stats

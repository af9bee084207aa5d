"""Statistics of the input h of the linear consuming a module's prunable units, for structured
pruning (techniques/structured.py): an MLP's intermediate channels h = act(x W_gateᵀ) * (x W_upᵀ)
(the input of down), or an attention module's heads side by side (the input of o):
Σh and Σh² per channel (fp64; mean, variance and ‖h_i‖₂ for the FLAP and Wanda-SP scores) and,
for `update="refit"`, H = Σ h hᵀ (the least-squares refit of W_down on the kept channels)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CalibrationError
from ...techniques.shrink import consumer
from ..base import AnalysisPass


@dataclass
class ChannelStats:
    sum: torch.Tensor      # [I] fp64
    sumsq: torch.Tensor    # [I] fp64
    xtx: torch.Tensor | None = None  # [I, I] fp32, or None
    count: int = 0

    def update(self, h: torch.Tensor) -> None:  # h: [N, I]
        h64 = h.double()
        self.sum += h64.sum(0)
        self.sumsq += (h64 * h64).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(h.float().t(), h.float())
        self.count += h.shape[0]

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

    def hooked_modules(self, ctx):
        self._downs = {f"{name}.{consumer(spec)}": name for name, (spec, _) in self.mlps.items()}
        return list(self._downs)

    def observe_module(self, ctx, name, x, y):
        mlp = self._downs[name]
        if not torch.isfinite(x).all():
            raise CalibrationError(f"NaN/Inf in the input of {name}: check the calibration "
                                   "batches and the model's dtype")
        table = ctx.stats.setdefault("channel_stats", {})
        if mlp not in table:
            i, kw = x.shape[1], dict(dtype=torch.float64, device=x.device)
            xtx = torch.zeros(i, i, dtype=torch.float32, device=x.device) if self.mlps[mlp][1] else None
            table[mlp] = ChannelStats(torch.zeros(i, **kw), torch.zeros(i, **kw), xtx)
        table[mlp].update(x)

"""|v| = |act(x W_gateᵀ)| of gated MLPs, sampled for CATS's thresholds (seed 000, CATS §3).

The gate module's output is observed (whatever it is: nn.Linear or a compressed linear), after
the recipe's pruning of the same block, on the block's input from the already-transformed
blocks before it. Up to MAX_SAMPLES values are kept per MLP: every value while they fit, else a
uniform random subset of each batch's values (a fixed share per batch, seeded per MLP).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...codegen.cats_mlp import ACTIVATIONS
from ...errors import CalibrationError
from ..base import AnalysisPass

MAX_SAMPLES = 1 << 20


@dataclass
class GateSamples:
    """The sampled |act(gate(x))| of one gated MLP."""

    act: str
    per_batch: int
    values: list = field(default_factory=list)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def update(self, y: torch.Tensor) -> None:
        v = ACTIVATIONS[self.act](y.detach().float()).abs().reshape(-1)
        if v.numel() > self.per_batch:
            v = v[torch.randint(v.numel(), (self.per_batch,), generator=self.generator).to(v.device)]
        self.values.append(v.cpu())

    def quantile(self, q: float) -> float:
        """t such that a fraction q of the sampled |v| lies below it (t = 0 for q = 0)."""
        v = torch.sort(torch.cat(self.values)).values
        return 0.0 if q == 0 else float(v[min(int(q * v.numel()), v.numel() - 1)])


class CollectGateActivations(AnalysisPass):
    name = "collect_gate_activations"
    produces = ("gate_activations",)
    after = ("module_forms", "weights")  # thresholds are calibrated on the pruned MLP

    def __init__(self, mlps: dict):
        super().__init__(modules=[])
        self.mlps = dict(mlps)  # {mlp name: GatedMLP}
        self._gates: dict[str, str] = {}

    @classmethod
    def from_targets(cls, targets):
        return cls({name: spec for name, (_, spec) in targets.items()})

    def hooked_modules(self, ctx):
        self._gates = {f"{name}.{spec.gate}": name for name, spec in self.mlps.items()}
        return list(self._gates)

    def observe_module(self, ctx, name, x, y):
        mlp = self._gates[name]
        if not torch.isfinite(y).all():
            raise CalibrationError(f"NaN/Inf in the gate activations of {mlp}: check the calibration batches and "
                                   "the model's dtype")
        table = ctx.stats.setdefault("gate_activations", {})
        if mlp not in table:
            table[mlp] = GateSamples(self.mlps[mlp].act, MAX_SAMPLES // max(len(ctx.batches), 1))
        table[mlp].update(y)

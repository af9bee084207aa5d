"""|v| = |act(x W_gateᵀ)| of gated MLPs, sampled for CATS's thresholds (seed 000, CATS §3).

The gate module's output is observed (whatever it is: nn.Linear or a compressed linear), after
the recipe's pruning of the same block, on the block's input from the already-transformed
blocks before it. Up to MAX_SAMPLES values are kept per MLP: every value while they fit, else a
uniform random subset of each batch's values (a fixed share per batch, seeded by the batch's
global index). After the block, every rank gathers every rank's samples in global batch order:
the thresholds of N ranks are one process's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...codegen.cats_mlp import ACTIVATIONS
from ...errors import CalibrationError
from ..base import AnalysisPass

MAX_SAMPLES = 1 << 20


def gate_sample(act: str, y: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """|act(y)| of one call of a gate, at most `limit` of them: a uniform subset drawn from a
    generator seeded with `seed` (derived from the global batch: the same draw on any rank)."""
    v = ACTIVATIONS[act](y.detach().float()).abs().reshape(-1)
    if v.numel() > limit:
        g = torch.Generator().manual_seed(seed)
        v = v[torch.randint(v.numel(), (limit,), generator=g).to(v.device)]
    return v.cpu()


@dataclass
class GateSamples:
    """The sampled |act(gate(x))| of one gated MLP: every batch's samples, in global batch order."""

    values: list = field(default_factory=list)

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

    def setup(self, ctx):
        super().setup(ctx)
        # the sample budget is shared by the batches of every rank (a collective: every rank sets up)
        total = int(ctx.comm.sum_exact_(torch.tensor([len(ctx.batches)], dtype=torch.int64)))
        self._per_batch = MAX_SAMPLES // max(total, 1)
        self._drawn: dict[str, dict[int, list]] = {}  # mlp -> global batch -> its calls' samples

    def hooked_modules(self, ctx):
        self._gates = {f"{name}.{spec.gate}": name for name, spec in self.mlps.items()}
        return list(self._gates)

    def observe_module(self, ctx, name, x, y):
        mlp = self._gates[name]
        if not torch.isfinite(y).all():
            raise CalibrationError(f"NaN/Inf in the gate activations of {mlp}: check the calibration batches and "
                                   "the model's dtype")
        calls = self._drawn.setdefault(mlp, {}).setdefault(ctx.global_batch, [])
        calls.append(gate_sample(self.mlps[mlp].act, y, self._per_batch, ctx.global_batch * 1024 + len(calls)))

    def reduce(self, ctx, names, comm):
        """Every rank's samples of the scope's MLPs, in global batch order."""
        table = ctx.stats.setdefault("gate_activations", {})
        for gate in names:
            mlp = self._gates[gate]
            drawn = {b: torch.cat(calls) for b, calls in self._drawn.pop(mlp, {}).items()}
            values = comm.gather_varlen_in_order(drawn, torch.float32, "cpu")
            if values:  # no rank ran it: no entry (the transform then says so)
                table[mlp] = GateSamples(values)

"""Ridge statistics of MoEfication's fitted routers (techniques/moe: router="fitted").

For each targeted gated MLP, the experts are split from its current (already pruned) weights
at the first observation, then every calibration token adds (x, s) with x the MLP input (the gate
linear's input) and s_e = ‖h_e‖₂ the norm of expert e's slice of h = act(x W_gateᵀ) * (x W_upᵀ)
(the down linear's input): only XᵀX and XᵀS are accumulated, no tokens kept. Over N ranks the
sums are all-reduced after the block (exact: techniques/moe/router.py `add`).
"""
from __future__ import annotations

import torch

from ...errors import CalibrationError
from ...techniques.moe.router import RouterStats
from ...techniques.moe.split import split_experts
from ..base import AnalysisPass


class CollectRouterStats(AnalysisPass):
    name = "collect_router_stats"
    produces = ("router_stats",)
    after = ("module_forms", "weights")  # routers are fitted on the pruned MLP

    def __init__(self, mlps: dict):
        super().__init__(modules=[])
        self.mlps = dict(mlps)  # {mlp name: (GatedMLP, num_experts)}
        self._roles: dict[str, tuple[str, str]] = {}
        self._x: dict[str, torch.Tensor] = {}

    @classmethod
    def from_targets(cls, targets):
        return cls({name: (spec, cfg.num_experts) for name, (cfg, spec) in targets.items()})

    def hooked_modules(self, ctx):
        self._roles = {}
        for name, (spec, _) in self.mlps.items():
            self._roles[f"{name}.{spec.gate}"] = (name, "x")
            self._roles[f"{name}.{spec.down}"] = (name, "h")
        return list(self._roles)

    def observe_module(self, ctx, name, x, y):
        mlp, role = self._roles[name]
        if role == "x":  # the gate runs before the down projection in each call of the MLP
            self._x[mlp] = x
            return
        x, h = self._x.pop(mlp), x.float()
        if not (torch.isfinite(x).all() and torch.isfinite(h).all()):
            raise CalibrationError(f"NaN/Inf in the activations of {mlp}: check the calibration batches and the "
                                   "model's dtype")
        table = ctx.stats.setdefault("router_stats", {})
        if mlp not in table:
            table[mlp] = self._empty(ctx, mlp, x.shape[1], x.device)
        table[mlp].add(x, h)

    def _empty(self, ctx, mlp, hidden, device):
        """Statistics of no token, the experts split from the MLP's current weights."""
        spec, experts = self.mlps[mlp]
        module = ctx.model.get_submodule(mlp)
        neurons = split_experts(getattr(module, spec.gate).weight, getattr(module, spec.up).weight, experts)
        return RouterStats.empty(hidden, neurons, device)

    def reduce(self, ctx, names, comm):
        """The scope's MLPs' sums over every rank's batches (fp32 partials in fp64: exact)."""
        if comm.world == 1:
            return
        table = ctx.stats.setdefault("router_stats", {})
        for name in names:
            mlp, role = self._roles[name]
            if role != "x":
                continue  # one MLP, two hooked modules
            spec, _ = self.mlps[mlp]
            gate = getattr(ctx.model.get_submodule(mlp), spec.gate).weight
            stats = table.get(mlp) or self._empty(ctx, mlp, gate.shape[1], gate.device)
            stats.all_reduce_(comm)
            if stats.n:  # no rank ran it: no entry, as in one process
                table[mlp] = stats

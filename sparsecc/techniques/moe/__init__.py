"""MoEfication: a dense gated MLP split into a mixture of experts (Zhang et al. 2022; seed 000
"MoE", seed 001 Switch Transformer).

    y = down(act(gate(x)) * up(x)) = Σ_e down_e(act(gate_e(x)) * up_e(x))

holds exactly when the I intermediate neurons are partitioned into E experts of I/E neurons
each (expert e keeps its neurons' rows of W_gate, W_up and columns of W_down). Running only the
top_k experts a router picks per token computes top_k/E of the neurons.

`MoEConfig(num_experts=8, top_k=2, capacity_factor=None, router="fitted")` targets gated MLP
modules (`sparsecc.graph.gated`), e.g. {"re:.*mlp": MoEConfig(8, 2)}:

- Split: balanced spherical k-means over the neurons' weight vectors [W_gate[i], W_up[i]] / ‖·‖
  (a few Lloyd iterations from a seeded start; each assignment step gives the (neuron, centroid)
  pairs to the most similar first, at most I/E neurons per centroid).
- Router, in fp32 (Switch's selective precision): "fitted" fits x ↦ s(x) by ridge least squares
  on the calibration tokens, where s_e(x) = ‖h_e(x)‖₂ is the norm of expert e's slice of
  h = act(x W_gateᵀ) * (x W_upᵀ), so the router ranks experts by how much they would contribute;
  only XᵀX and XᵀS are accumulated (passes/analysis/router_stats.py, no tokens kept). "centroid" is
  data-free: router row e = the mean of expert e's normalised W_gate rows.
- Routing: the top_k experts by router logit, summed unweighted (k = E is the dense MLP); with
  capacity_factor c, each expert takes at most ceil(c·T·k/E) tokens of a call (Switch capacity),
  the rest get nothing from it. The MLP becomes `MoEMLP`, one op: `torch.ops.sparsecc.moe_ffn`.

Block by block, routers are fitted after the block's weight pruning, on the outputs of the
already-rewritten blocks before it (as CATS calibrates); the split and the router are the
decision a Plan stores. `moe_load_balance` measures Switch's balance statistics.

`SparseMoEConfig()` lowers models that are MoE already (Mixtral's sparse MoE blocks, data-free)
to the same MoEMLP/op in mode "softmax_topk", unchanged, optionally with a capacity limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import PlanError, RecipeError
from ...graph.gated import GatedMLP
from ..configs import SparsityConfig, register_technique
from ..rewrites import ModuleRewrite
from .balance import moe_load_balance
from .module import MoEMLP
from .router import RouterStats, centroid_router
from .rows import check_capacity, moe_row, restore_moe
from .sparse_moe import SparseMoEConfig, SparseMoETechnique, lower_sparse_moe, sparse_moe_block
from .split import split_experts

ROUTERS = ("fitted", "centroid")

__all__ = ["MoEConfig", "MoEMLP", "MoETechnique", "RouterStats", "SparseMoEConfig", "SparseMoETechnique",
           "centroid_router", "lower_sparse_moe", "moe_from_dense", "moe_load_balance", "restore_moe",
           "sparse_moe_block", "split_experts"]


@dataclass(frozen=True)
class MoEConfig(SparsityConfig):
    """Split a gated MLP into `num_experts` experts and run the `top_k` a router picks per token."""

    TARGET = "gated_mlp"
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = None
    router: str = "fitted"

    def validate(self) -> None:
        for field in ("num_experts", "top_k"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecipeError(f"MoEConfig.{field} must be an integer >= 1, got {v!r}")
        if self.top_k > self.num_experts:
            raise RecipeError(f"MoEConfig: top_k={self.top_k} > num_experts={self.num_experts}; choose "
                              f"top_k <= {self.num_experts} (top_k = num_experts is the dense MLP)")
        check_capacity(self.capacity_factor, "MoEConfig")
        if self.router not in ROUTERS:
            raise RecipeError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")


@register_technique(MoEConfig)
class MoETechnique(ModuleRewrite):
    requires = ("router_stats",)  # router="fitted" only
    rebuilds_linears = True
    what = "gated MLP (down(act(gate(x)) * up(x)), as in Llama or Mistral)"
    order = 25

    def needs(self, config: MoEConfig):
        return self.requires if config.router == "fitted" else ()

    def candidates(self, captured) -> dict[str, GatedMLP]:
        return captured.gated

    def spec_from_dict(self, data) -> GatedMLP:
        return GatedMLP(**data)

    def check(self, config, model, name, spec):
        _check(model, name, spec, config)

    def plan(self, config, model, name, spec, stats):
        """{neurons [E, I/E], router_weight [E, H], router_bias [E], router_r2}: the split of the
        MLP's current weights and its router (fitted on `stats["router_stats"]`, or centroid)."""
        mlp = _check(model, name, spec, config)
        if config.router == "centroid":
            gate = getattr(mlp, spec.gate).weight
            neurons = split_experts(gate, getattr(mlp, spec.up).weight, config.num_experts)
            weight, bias = centroid_router(gate, neurons)
            return {"neurons": neurons.cpu(), "router_weight": weight.float().cpu(), "router_bias": bias.float().cpu()}
        fit = stats["router_stats"]
        weight, bias, r2 = fit.solve()
        return {"neurons": fit.neurons.cpu(), "router_weight": weight.float().cpu(), "router_bias": bias.float().cpu(),
                "router_r2": torch.tensor(r2, dtype=torch.float64)}  # fit on the calibration tokens

    def check_decision(self, config, spec, decision):
        e = config.num_experts
        neurons, weight, bias = (decision.get(k) for k in ("neurons", "router_weight", "router_bias"))
        if neurons is None or weight is None or bias is None:
            return "needs neurons, router_weight and router_bias"
        if neurons.dim() != 2 or neurons.shape[0] != e or neurons.dtype not in (torch.int32, torch.int64):
            return f"neurons must be an integer [{e}, I/{e}] tensor, got {neurons.dtype} {list(neurons.shape)}"
        if weight.dim() != 2 or weight.shape[0] != e or list(bias.shape) != [e]:
            return f"the router must be [{e}, hidden] and [{e}], got {list(weight.shape)} and {list(bias.shape)}"
        return None

    def apply(self, config, model, name, spec, decision, tx):
        mlp = _check(model, name, spec, config)
        neurons = decision["neurons"].to(torch.long)
        inter = getattr(mlp, spec.gate).weight.shape[0]
        if tuple(neurons.shape) != (config.num_experts, inter // config.num_experts) or not torch.equal(
                neurons.flatten().sort().values, torch.arange(inter)):
            raise PlanError(f"{name}: the MoE split must be a [{config.num_experts}, {inter // config.num_experts}] "
                            f"partition of the {inter} neurons, got {list(neurons.shape)}")
        moe = moe_from_dense(mlp, spec, neurons, (decision["router_weight"], decision["router_bias"]), config)
        tx.swap(name, moe)
        r2 = decision.get("router_r2")
        return moe_row(name, config, moe, router=config.router, router_r2=None if r2 is None else float(r2),
                       gated=spec.to_dict())

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        return restore_moe(model, rows)


def _check(model: nn.Module, name: str, spec: GatedMLP, cfg: MoEConfig) -> nn.Module:
    mlp = model.get_submodule(name)
    linears = [getattr(mlp, c) for c in (spec.gate, spec.up, spec.down)]
    if not all(type(lin) is nn.Linear for lin in linears):
        raise RecipeError(f"{name}: MoEConfig splits nn.Linear weights; its linears are "
                          f"{[type(lin).__name__ for lin in linears]} (apply MoEConfig before compress_nm_)")
    inter = linears[0].weight.shape[0]
    if inter % cfg.num_experts:
        fits = [d for d in range(2, min(inter, 64) + 1) if inter % d == 0]
        raise RecipeError(f"{name}: intermediate size {inter} is not divisible by num_experts={cfg.num_experts}; "
                          f"experts must be equal, choose num_experts among {fits[:12]}")
    return mlp


def moe_from_dense(mlp: nn.Module, spec: GatedMLP, neurons: torch.Tensor, router: tuple, cfg: MoEConfig) -> MoEMLP:
    """The MoEMLP whose expert e holds the dense MLP's neurons `neurons[e]`."""
    gate, up, down = (getattr(mlp, c) for c in (spec.gate, spec.up, spec.down))
    (e, m), hidden, flat = neurons.shape, gate.weight.shape[1], neurons.reshape(-1)
    bias = tuple(lin.bias is not None for lin in (gate, up, down))
    w = gate.weight
    moe = MoEMLP(hidden, m, e, cfg.top_k, cfg.capacity_factor, spec.act, "sum", bias, True, w.dtype, w.device)
    with torch.no_grad():
        moe.w_gate.copy_(gate.weight[flat].view(e, m, hidden))
        moe.w_up.copy_(up.weight[flat].view(e, m, hidden))
        moe.w_down.copy_(down.weight[:, flat].view(hidden, e, m).transpose(0, 1))
        if bias[0]:
            moe.b_gate.copy_(gate.bias[flat].view(e, m))
        if bias[1]:
            moe.b_up.copy_(up.bias[flat].view(e, m))
        if bias[2]:
            moe.b_down.copy_(down.bias)
        moe.router_weight.copy_(router[0])
        moe.router_bias.copy_(router[1])
    return moe

"""`SparseMoEConfig`: models that are MoE already (Mixtral's sparse MoE blocks) lowered, data-free,
to the same MoEMLP and op in mode "softmax_topk", unchanged, optionally with a capacity limit."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...codegen.cats_mlp import ACTIVATIONS
from ...errors import RecipeError
from ..configs import SparsityConfig, register_technique
from ..rewrites import ModuleRewrite
from .module import MoEMLP
from .rows import check_capacity, moe_row, restore_moe


@dataclass(frozen=True)
class SparseMoEConfig(SparsityConfig):
    """Lower a transformers sparse-MoE block (Mixtral's: router `gate` [E, H], experts stored as
    3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]) to a MoEMLP running moe_ffn in mode
    "softmax_topk": y = Σ_{top-k} softmax(top-k logits)_e · expert_e(x) (seed 000, Mixtral). The
    function is unchanged (checked on a probe input); optionally adds Switch's capacity limit."""

    TARGET = "sparse_moe"
    capacity_factor: float | None = None

    def validate(self) -> None:
        check_capacity(self.capacity_factor, type(self).__name__)


def _act_of(fn: nn.Module) -> str | None:
    """The ACTIVATIONS key computing the same function as `fn`, found on a probe."""
    v = torch.linspace(-6, 6, 97)
    return next((k for k, f in ACTIVATIONS.items() if torch.allclose(fn(v), f(v), atol=1e-6)), None)


def sparse_moe_block(module: nn.Module) -> dict | None:
    """{experts, top_k, act} if `module` is a sparse-MoE block of Mixtral's layout, else None."""
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if {n for n, _ in module.named_children()} != {"gate", "experts"}:
        return None  # e.g. Qwen2-MoE's shared expert: not this form
    w, gu, down = (getattr(m, a, None) for m, a in ((gate, "weight"), (experts, "gate_up_proj"),
                                                     (experts, "down_proj")))
    if not all(isinstance(t, torch.Tensor) for t in (w, gu, down)) or (w.dim(), gu.dim(), down.dim()) != (2, 3, 3):
        return None
    e, hidden = w.shape
    top_k = getattr(gate, "top_k", getattr(module, "top_k", None))
    act = _act_of(experts.act_fn) if isinstance(getattr(experts, "act_fn", None), nn.Module) else None
    if (gu.shape[0], gu.shape[2], down.shape[:2]) != (e, hidden, (e, hidden)) or gu.shape[1] != 2 * down.shape[2] \
            or not isinstance(top_k, int) or act is None:
        return None
    return {"experts": e, "top_k": top_k, "act": act}


@register_technique(SparseMoEConfig)
class SparseMoETechnique(ModuleRewrite):
    requires = ()
    what = "sparse MoE block (router `gate` + 3-D `experts` weights, as in Mixtral)"
    order = 26

    def candidates(self, captured) -> dict[str, dict]:
        return {n: spec for n, m in captured.model.named_modules() if (spec := sparse_moe_block(m)) is not None}

    def apply(self, config, model, name, spec, decision, tx):
        moe = lower_sparse_moe(model.get_submodule(name), name, spec, config)
        tx.swap(name, moe)
        return moe_row(name, config, moe, router="model's", router_r2=None)

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        return restore_moe(model, rows, technique="SparseMoEConfig")


@torch.no_grad()
def lower_sparse_moe(block: nn.Module, name: str, spec: dict, config: SparseMoEConfig) -> MoEMLP:
    """The MoEMLP computing sparse-MoE block `block`; a block it does not reproduce on a probe input
    (another weight layout or router) is an error."""
    gu, down = block.experts.gate_up_proj, block.experts.down_proj
    e, hidden, inter = down.shape
    moe = MoEMLP(hidden, inter, e, spec["top_k"], None, spec["act"], "softmax_topk", (False, False, False),
                 False, gu.dtype, gu.device)
    moe.w_gate.copy_(gu[:, :inter])   # [gate; up] concatenated along the neurons
    moe.w_up.copy_(gu[:, inter:])
    moe.w_down.copy_(down)
    moe.router_weight.copy_(block.gate.weight.float())
    probe = torch.randn(2, 8, hidden, generator=torch.Generator().manual_seed(0)).to(gu.device, gu.dtype)
    want, got = block(probe), moe(probe)
    tol = (1e-4 if gu.dtype in (torch.float32, torch.float64) else 2e-2) * max(1.0, float(want.abs().max()))
    if not float((want - got).abs().max()) <= tol:
        raise RecipeError(f"{name}: {type(block).__name__} is not computed as Mixtral's sparse MoE block "
                          "(weight layout or router differ); SparseMoEConfig cannot lower it")
    moe.capacity_factor = config.capacity_factor
    return moe

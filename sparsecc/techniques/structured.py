"""Structured pruning of gated-MLP channels: whole intermediate channels removed, the linears
really shrunk (seed 004; FLAP, An et al. 2024).

    sparsecc.sparsify_(model, {"re:.*mlp": StructuredConfig(0.5, score="flap", update="refit")}, batches)

Channel i of a gated MLP is row i of W_gate and W_up and column i of W_down; h_i is its
activation act(x W_gateᵀ)_i (x W_upᵀ)_i. A `sparsity` share of the channels with the lowest score
is removed (the same share in every targeted MLP), by `score`:

- "magnitude": Σ|W| over the channel's weights (data-free);
- "wanda-sp":  Σ_j |W_down[j, i]| · ‖h_i‖₂, Wanda's score summed over the channel (FLAP's baseline);
- "flap":      Var(h_i) · ‖W_down[:, i]‖₂², FLAP's fluctuation metric, with its bias compensation:
               the mean of what the removed channels fed W_down goes into its bias, so the output's
               mean over the calibration tokens is kept.

`update="refit"` re-fits W_down on the kept channels K by least squares on H = Σ h hᵀ of the
calibration tokens: W_K = W H[:, K] H[K, K]⁻¹ (H damped as SparseGPT damps it). Statistics are
collected block by block on the block's pruned weights (passes/analysis/channel_stats.py). The
decision a Plan stores: the kept channels, and W_down / its bias where they were updated.
Checkpoints: the shrunk linears are saved as they are; `load_pruned` rebuilds them from the report
rows. Attention heads and whole blocks (issue 14) are not built yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlanError, RecipeError
from ..graph.gated import GatedMLP
from ..prune.masks import check_sparsity
from ..prune.sparsegpt import dampen
from .configs import SparsityConfig, register_technique
from .rewrites import ModuleRewrite

SCORES = ("magnitude", "wanda-sp", "flap")
UPDATES = (None, "refit")


@dataclass(frozen=True)
class StructuredConfig(SparsityConfig):
    """Remove a `sparsity` share of a gated MLP's intermediate channels, ranked by `score`."""

    TARGET = "gated_mlp"
    sparsity: float = 0.5
    score: str = "wanda-sp"
    update: str | None = None
    damp: float = 0.01

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        if self.score not in SCORES:
            raise RecipeError(f"StructuredConfig.score must be one of {SCORES}, got {self.score!r}")
        if self.update not in UPDATES:
            raise RecipeError(f"StructuredConfig.update must be None or 'refit', got {self.update!r}")
        if not 0 <= self.damp < 1:
            raise RecipeError(f"StructuredConfig.damp must be in [0, 1), got {self.damp!r}")


def kept_count(config: StructuredConfig, channels: int) -> int:
    return int(round(channels * (1 - config.sparsity)))


@register_technique(StructuredConfig)
class StructuredTechnique(ModuleRewrite):
    requires = ("channel_stats",)
    what = "gated MLP (down(act(gate(x)) * up(x)), as in Llama or Mistral)"
    order = 10  # before the other MLP rewrites

    def needs(self, config):
        return () if config.score == "magnitude" and config.update is None else self.requires

    def candidates(self, captured) -> dict[str, GatedMLP]:
        return captured.gated

    def spec_from_dict(self, data) -> GatedMLP:
        return GatedMLP(**data)

    def check(self, config, model, name, spec):
        linears = _linears(model, name, spec)
        if not all(type(lin) is nn.Linear for lin in linears):
            raise RecipeError(f"{name}: StructuredConfig shrinks nn.Linear weights; its linears are "
                              f"{[type(lin).__name__ for lin in linears]} (prune before packing)")
        channels = linears[0].out_features
        if kept_count(config, channels) < 1:
            raise RecipeError(f"{name}: sparsity {config.sparsity} of {channels} channels would leave no channel; "
                              f"use a sparsity below {1 - 0.5 / channels:.4f}")

    def plan(self, config, model, name, spec, stats):
        """{keep: the kept channels (ascending)} plus down_weight / down_bias where they change."""
        gate, up, down = _linears(model, name, spec)
        w_down = down.weight.detach().float()
        ch = stats.get("channel_stats")
        if config.score == "magnitude":
            score = gate.weight.abs().sum(1) + up.weight.abs().sum(1) + down.weight.abs().sum(0)
        elif config.score == "wanda-sp":
            score = w_down.abs().sum(0) * ch.l2.to(w_down)
        else:  # flap
            score = ch.variance.to(w_down) * (w_down * w_down).sum(0)
        k = kept_count(config, score.numel())
        keep = torch.sort(torch.topk(score.float(), k).indices).values
        decision = {"keep": keep.cpu()}
        new_w = w_down[:, keep]
        if config.update == "refit":
            h, _ = dampen(ch.xtx.to(w_down), config.damp)
            hk = h[keep][:, keep]
            new_w = torch.linalg.solve(hk, (w_down @ h[:, keep]).t()).t()  # W H[:, K] H[K, K]⁻¹ (hk symmetric)
            decision["down_weight"] = new_w.to(down.weight.dtype).cpu()
        if config.score == "flap":  # keep the output's mean: b += W mean(h) - W_K mean(h_K)
            mean = ch.mean.to(w_down)
            bias = down.bias.detach().float() if down.bias is not None else torch.zeros_like(w_down[:, 0])
            decision["down_bias"] = (bias + w_down @ mean - new_w @ mean[keep]).to(down.weight.dtype).cpu()
        return decision

    def check_decision(self, config, spec, decision):
        keep = decision.get("keep")
        if keep is None or keep.dim() != 1 or keep.dtype not in (torch.int32, torch.int64) or not keep.numel():
            return "needs keep, the kept channels as a 1-D integer tensor"
        if not bool((keep[1:] > keep[:-1]).all()):
            return "keep must be ascending channel indices"
        return None

    def apply(self, config, model, name, spec, decision, tx):
        problem = self.check_decision(config, spec, decision)
        gate, up, down = _linears(model, name, spec)
        keep = decision["keep"].to(device=gate.weight.device, dtype=torch.long)
        if problem or int(keep[-1]) >= gate.out_features:
            raise PlanError(f"{name}: the structured decision {problem or 'names channels the MLP does not have'}")
        new_gate, new_up = _rows(gate, keep), _rows(up, keep)
        weight = decision.get("down_weight", down.weight.detach()[:, keep])
        bias = decision.get("down_bias", down.bias.detach() if down.bias is not None else None)
        new_down = _linear(weight.to(down.weight), None if bias is None else bias.to(down.weight))
        for child, lin in ((spec.gate, new_gate), (spec.up, new_up), (spec.down, new_down)):
            tx.swap(f"{name}.{child}", lin)
        channels = gate.out_features
        return {"module": name, "param": None, "technique": "StructuredConfig", "config": config.to_dict(),
                "shape": None, "sparsity": 1 - keep.numel() / channels, "channels": channels, "kept": keep.numel(),
                "down_bias": bias is not None, "label": f"{keep.numel()}/{channels} channels",
                "gated": spec.to_dict(), "error": None, "error_kind": None}

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        """Shrink the MLPs the rows name to their saved widths (zero weights: the checkpoint's state
        dict loads into them afterwards); checks every row before changing anything."""
        todo = []
        for row in rows:
            try:
                spec, kept = GatedMLP(**row["gated"]), int(row["kept"])
                gate, up, down = _linears(model, spec.name, spec)
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise PlanError(f"structured row {row.get('module')!r} does not fit the model ({e!r})") from None
            todo.append((spec, kept, gate, up, down, bool(row.get("down_bias"))))
        for spec, kept, gate, up, down, has_bias in todo:
            idx = torch.arange(kept, device=gate.weight.device)
            mlp = model.get_submodule(spec.name)
            setattr(mlp, spec.gate, _rows(gate, idx))
            setattr(mlp, spec.up, _rows(up, idx))
            bias = torch.zeros(down.out_features, dtype=down.weight.dtype, device=down.weight.device)
            setattr(mlp, spec.down, _linear(down.weight.detach()[:, idx].clone(), bias if has_bias else None))
        return [spec.name for spec, *_ in todo]


def _linears(model: nn.Module, name: str, spec: GatedMLP) -> list[nn.Module]:
    mlp = model.get_submodule(name)
    return [getattr(mlp, c) for c in (spec.gate, spec.up, spec.down)]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _rows(lin: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """A new nn.Linear computing only the output features `keep` of `lin`."""
    return _linear(lin.weight.detach()[keep], None if lin.bias is None else lin.bias.detach()[keep])

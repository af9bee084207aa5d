"""Structured pruning: whole MLP channels and attention heads removed, the linears really shrunk
(seed 004; FLAP, An et al. 2024; Bonsai, Dery et al. 2024).

    sparsecc.sparsify_(model, {"re:.*mlp": StructuredConfig(0.5, score="flap", update="refit"),
                               "re:.*self_attn": StructuredConfig(0.25)}, batches)

Targets: gated MLPs (down(act(gate(x)) * up(x)), Llama), plain ones (down(act(up(x))), OPT's
fc1/fc2 under the decoder layer), and attention modules with separate q/k/v/o projections
(graph/heads.py). A unit (shrink.py) is an MLP's intermediate channel — rows of gate/up, a column
of down — or a query head — head_dim rows of q, head_dim columns of o. Query heads go evenly in
each key/value group (grouped-query attention keeps its shape); with `unit="kv_group"`, or when
every group has one query head (plain multi-head attention), whole groups go, k and v shrinking
too. A `sparsity` share of the units with the lowest score is removed in every targeted module,
the score summed over the unit's columns c of the consumer (down / o), whose input h is observed:

- "magnitude": Σ|W| over the unit's weights (data-free);
- "wanda-sp":  Σ_j |W[j, c]| · ‖h_c‖₂, Wanda's score summed over the unit (FLAP's baseline);
- "flap":      Var(h_c) · ‖W[:, c]‖₂², FLAP's fluctuation metric, with its bias compensation:
               the mean of what the removed units fed the consumer goes into its bias, so the
               output's mean over the calibration tokens is kept;
- "bonsai":    relevance from forward passes only: the calibration loss of `samples` randomly
               masked sub-models regressed on their masks (passes/analysis/unit_relevance.py);
- L0Config (techniques/l0.py, a config of its own): hard-concrete gates learned on the calibration
               batches toward the target size, their log_alpha the score (passes/analysis/unit_gates.py).

Widths: every targeted module loses `sparsity` of its units by default; `layerwise="global"` ranks
the units of all modules sharing the config together instead (FLAP's adaptive structure search:
each module's scores standardised, the lowest removed across modules, on the dense model; a module
keeps at least one unit — one head per group), so the modules that matter less lose more.

`update="refit"` re-fits the consumer on the kept columns K by least squares on H = Σ h hᵀ of the
calibration tokens: W_K = W H[:, K] H[K, K]⁻¹ (H damped as SparseGPT damps it). Statistics are
collected block by block on the block's pruned weights (passes/analysis/channel_stats.py). The
decision a Plan stores: the kept units (and key/value heads), and the consumer's weight / bias
where they changed. Checkpoints: `load_pruned` rebuilds the shrunk linears from the report rows;
where every MLP (or attention module) keeps the same width, the saved config says so and plain
`from_pretrained` loads the folder too (`shrunk_config`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlanError, RecipeError
from ..graph.gated import GatedMLP, PlainMLP
from ..graph.heads import AttentionHeads
from ..prune.masks import check_sparsity
from ..prune.sparsegpt import dampen
from . import shrink
from .configs import SparsityConfig, register_technique
from .rewrites import ModuleRewrite

SCORES = ("magnitude", "wanda-sp", "flap", "bonsai")
UPDATES = (None, "refit")
UNITS = ("head", "kv_group")


@dataclass(frozen=True)
class StructuredConfig(SparsityConfig):
    """Remove a `sparsity` share of an MLP's intermediate channels or an attention module's heads,
    ranked by `score`; `unit="kv_group"` removes whole key/value groups of heads."""

    TARGET = "MLP or q/k/v/o attention"  # for errors: "matches no MLP or q/k/v/o attention module"
    sparsity: float = 0.5
    score: str = "wanda-sp"
    update: str | None = None
    damp: float = 0.01
    unit: str = "head"
    layerwise: str | None = None  # "global": FLAP's adaptive widths (passes/analysis/unit_budget.py)
    samples: int = 64   # "bonsai": sub-models evaluated
    seed: int = 0       # "bonsai": their random masks

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        if self.score not in SCORES:
            raise RecipeError(f"StructuredConfig.score must be one of {SCORES}, got {self.score!r}")
        if self.update not in UPDATES:
            raise RecipeError(f"StructuredConfig.update must be None or 'refit', got {self.update!r}")
        if not 0 <= self.damp < 1:
            raise RecipeError(f"StructuredConfig.damp must be in [0, 1), got {self.damp!r}")
        if self.layerwise not in (None, "global"):
            raise RecipeError(f"StructuredConfig.layerwise must be None (every module loses `sparsity`) or 'global' "
                              f"(scores ranked across modules), got {self.layerwise!r}")
        if self.unit not in UNITS:
            raise RecipeError(f"StructuredConfig.unit must be one of {UNITS}, got {self.unit!r}")
        for name in ("samples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "samples" else 0):
                raise RecipeError(f"StructuredConfig.{name} must be an integer >= {1 if name == 'samples' else 0}, "
                                  f"got {value!r}")


def unit_layout(spec) -> tuple[str, int]:
    """(child name of the linear whose input columns are the units, input columns per unit)."""
    return shrink.consumer(spec), shrink.width(spec)


def kept_count(config: StructuredConfig, units: int) -> int:
    """Units kept: `sparsity` of them removed, rounded half up (a quarter of 2 groups removes 1)."""
    return units - math.floor(units * config.sparsity + 0.5)


def whole_groups(config: StructuredConfig, spec) -> bool:
    return isinstance(spec, AttentionHeads) and (config.unit == "kv_group" or spec.groups == 1)


def _count(config: StructuredConfig, spec, units: int) -> tuple[int, int, str, str]:
    """(kept, out of, what they are, what none kept means) for one module."""
    if not isinstance(spec, AttentionHeads):
        return kept_count(config, units), units, "channels", "no channel"
    if whole_groups(config, spec):
        return kept_count(config, spec.kv_heads), spec.kv_heads, "key/value groups", "no key/value group"
    return (kept_count(config, spec.groups), spec.groups, "query heads per key/value group",
            "no query head in a key/value group")


@register_technique(StructuredConfig)
class StructuredTechnique(ModuleRewrite):
    what = "MLP (gated or plain) or attention module with separate q/k/v/o projections"
    order = 10  # before the other MLP rewrites
    rebuilds_linears = True

    def needs(self, config):
        needs = ("unit_relevance",) if config.score == "bonsai" else ()
        if config.score in ("wanda-sp", "flap") or config.update == "refit":
            needs += ("channel_stats",)
        return needs + (("unit_sparsity",) if config.layerwise == "global" else ())

    def candidates(self, captured) -> dict:
        return {**captured.gated, **captured.plain, **captured.heads}

    def spec_from_dict(self, data):
        kind = data.get("kind", "gated")
        fields = {k: v for k, v in data.items() if k != "kind"}
        return {"gated": GatedMLP, "mlp": PlainMLP, "heads": AttentionHeads}[kind](**fields)

    def spec_to_dict(self, spec):
        return {"kind": "gated", **spec.to_dict()} if isinstance(spec, GatedMLP) else spec.to_dict()

    def check(self, config, model, name, spec):
        linears = module_linears(model, spec)
        if not all(type(lin) is nn.Linear for lin in linears.values()):
            raise RecipeError(f"{name}: StructuredConfig shrinks nn.Linear weights; its linears are "
                              f"{[type(lin).__name__ for lin in linears.values()]} (prune before packing)")
        kept, total, what, none = _count(config, spec, _units(spec, linears))
        fix = "; or unit='kv_group' to remove whole groups" if what.startswith("query") else ""
        share = getattr(config, "SHARE", "sparsity")  # the field holding the share removed (L0Config: target)
        if kept == total and config.sparsity > 0:
            raise RecipeError(f"{name}: {share} {config.sparsity} of {total} {what} removes nothing; use a "
                              f"{share} of at least {0.5 / total:.4f}{fix}")
        if kept < 1:
            raise RecipeError(f"{name}: {share} {config.sparsity} would leave {none} (of {total}); use a {share} "
                              f"below {1 - 0.5 / total:.4f}{fix}")
        if fix and abs(total - kept - total * config.sparsity) > 1e-6:  # heads per group: too coarse to round
            raise RecipeError(f"{name}: {share} {config.sparsity} of {total} {what} is no whole number of heads; "
                              f"use a multiple of {1 / total:.4f}{fix}")

    def plan(self, config, model, name, spec, stats):
        """{keep: the kept units, ascending; keep_kv: the kept key/value heads where whole groups go}
        plus weight / bias of the consumer where they change."""
        linears = module_linears(model, spec)
        cons = linears[shrink.consumer(spec)]
        w = cons.weight.detach().float()
        score = unit_scores(config, spec, linears, stats)
        if config.layerwise == "global":  # this module's share of the budget, decided on the dense model
            config = dataclasses.replace(config, sparsity=stats["unit_sparsity"])
        keep, keep_kv = _select(config, spec, score)
        decision = {"keep": keep.cpu()} | ({"keep_kv": keep_kv.cpu()} if keep_kv is not None else {})
        cols = shrink.columns(keep.to(w.device), shrink.width(spec))
        new_w = w[:, cols]
        ch = stats.get("channel_stats")
        if config.update == "refit":
            h, _ = dampen(ch.xtx.to(w), config.damp)
            hk = h[cols][:, cols]
            new_w = torch.linalg.solve(hk, (w @ h[:, cols]).t()).t()  # W H[:, K] H[K, K]⁻¹ (hk symmetric)
            decision["weight"] = new_w.to(cons.weight.dtype).cpu()
        if config.score == "flap":  # keep the output's mean: b += W mean(h) - W_K mean(h_K)
            mean = ch.mean.to(w)
            bias = cons.bias.detach().float() if cons.bias is not None else torch.zeros_like(w[:, 0])
            decision["bias"] = (bias + w @ mean - new_w @ mean[cols]).to(cons.weight.dtype).cpu()
        return decision

    def check_decision(self, config, spec, decision):
        for key in ("keep", "keep_kv"):
            keep = decision.get(key)
            if keep is None and key == "keep_kv":
                continue
            if keep is None or keep.dim() != 1 or keep.dtype not in (torch.int32, torch.int64) or not keep.numel():
                return f"needs {key}, the kept units as a 1-D integer tensor"
            if not bool((keep[1:] > keep[:-1]).all()):
                return f"{key} must be ascending indices"
        return None

    def apply(self, config, model, name, spec, decision, tx):
        problem = self.check_decision(config, spec, decision)
        linears = module_linears(model, spec)
        units = _units(spec, linears)
        cons = linears[shrink.consumer(spec)]
        keep = decision.get("keep")
        keep_kv = decision.get("keep_kv")
        if not problem and (int(keep[-1]) >= units or keep_kv is not None and (
                not isinstance(spec, AttentionHeads) or int(keep_kv[-1]) >= spec.kv_heads)):
            problem = "names units the module does not have"
        if problem:
            raise PlanError(f"{name}: the structured decision {problem}")
        device = cons.weight.device
        keep = keep.to(device=device, dtype=torch.long)
        keep_kv = None if keep_kv is None else keep_kv.to(device=device, dtype=torch.long)
        cols = shrink.columns(keep, shrink.width(spec))
        weight = decision.get("weight", cons.weight.detach()[:, cols]).to(cons.weight)
        bias = decision.get("bias", cons.bias.detach() if cons.bias is not None else None)
        shrink.shrink(model, spec, keep, keep_kv, weight, None if bias is None else bias.to(cons.weight), tx.swap)
        row = {"module": name, "param": None, "technique": "StructuredConfig", "config": config.to_dict(),
               "shape": None, "sparsity": 1 - keep.numel() / units, "units": units, "kept": keep.numel(),
               "bias": bias is not None, "spec": self.spec_to_dict(spec), "error": None, "error_kind": None}
        if isinstance(spec, AttentionHeads):
            kv = spec.kv_heads if keep_kv is None else keep_kv.numel()
            shrink.head_counts(model.get_submodule(name), spec, keep.numel(), kv, tx.set_attr)
            return row | {"kv_kept": kv, "label": f"{keep.numel()}/{units} heads, {kv}/{spec.kv_heads} kv"}
        return row | {"label": f"{keep.numel()}/{units} channels"}

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        """Shrink the modules the rows name to their saved widths (weights zero: the checkpoint's
        state dict loads into them afterwards); checks every row before changing anything. A module
        already at its saved width (a folder whose config says so) is left as it is."""
        todo = []
        for row in rows:
            try:
                spec = self.spec_from_dict(row.get("spec") or {"kind": "gated", **row["gated"]})
                kept = int(row["kept"])
                kv = int(row.get("kv_kept", spec.kv_heads if isinstance(spec, AttentionHeads) else 0))
                linears = module_linears(model, spec)
                if linears[shrink.consumer(spec)].in_features < kept * shrink.width(spec):
                    raise ValueError(f"{shrink.consumer(spec)} has fewer than the {kept} units saved")
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise PlanError(f"structured row {row.get('module')!r} does not fit the model ({e!r})") from None
            todo.append((spec, kept, kv, linears, bool(row.get("bias", row.get("down_bias")))))
        for spec, kept, kv, linears, has_bias in todo:
            cons = linears[shrink.consumer(spec)]
            device, dtype = cons.weight.device, cons.weight.dtype
            keep = torch.arange(kept, device=device)
            keep_kv = torch.arange(kv, device=device) if isinstance(spec, AttentionHeads) else None
            cols = shrink.columns(keep, shrink.width(spec))
            bias = torch.zeros(cons.out_features, dtype=dtype, device=device) if has_bias else None
            swap = lambda n, m: _set(model, n, m)  # noqa: E731
            shrink.shrink(model, spec, keep, keep_kv, cons.weight.detach()[:, cols].clone(), bias, swap)
            if isinstance(spec, AttentionHeads):
                shrink.head_counts(model.get_submodule(spec.name), spec, kept, kv, setattr)
        return [spec.name for spec, *_ in todo]


def unit_scores(config: StructuredConfig, spec, linears: dict, stats: dict) -> torch.Tensor:
    """Score of each unit of one module (higher: kept), from its linears and its statistics."""
    w = linears[shrink.consumer(spec)].weight.detach().float()
    width = shrink.width(spec)
    if config.score == "bonsai":
        return stats["unit_relevance"].float().to(w.device)
    if config.score == "l0":  # the learned gates' log_alpha (techniques/l0.py)
        return stats["unit_gates"].float().to(w.device)
    if config.score == "magnitude":
        col = w.abs().sum(0)
        for child in shrink.producers(spec):
            col = col + linears[child].weight.detach().float().abs().sum(1)
    else:
        ch = stats["channel_stats"]
        if config.score == "wanda-sp":
            col = w.abs().sum(0) * ch.l2.to(w)
        else:  # flap
            col = ch.variance.to(w) * (w * w).sum(0)
    score = col.reshape(-1, width).sum(1)
    if config.score == "magnitude" and whole_groups(config, spec):  # k, v rows of each group
        kv = sum(linears[c].weight.detach().float().abs().sum(1) for c in (spec.k, spec.v))
        score = score + (kv.reshape(spec.kv_heads, width).sum(1) / spec.groups).repeat_interleave(spec.groups)
    return score


def _select(config, spec, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(kept units, kept key/value heads or None): the top-scoring units; query heads evenly per
    group, or whole groups ranked by the sum of their heads' scores."""
    if not isinstance(spec, AttentionHeads):
        return _top(score, kept_count(config, score.numel())), None
    if whole_groups(config, spec):
        groups = _top(score.reshape(spec.kv_heads, spec.groups).sum(1), kept_count(config, spec.kv_heads))
        return shrink.columns(groups, spec.groups), groups
    per_group = score.reshape(spec.kv_heads, spec.groups)
    k = kept_count(config, spec.groups)
    keep = torch.sort(torch.topk(per_group, k, dim=1).indices, dim=1).values
    return (keep + torch.arange(spec.kv_heads, device=keep.device)[:, None] * spec.groups).reshape(-1), None


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(score.float(), k).indices).values


def module_linears(model: nn.Module, spec) -> dict[str, nn.Module]:
    module = model.get_submodule(spec.name)
    names = [*shrink.producers(spec), shrink.consumer(spec)]
    if isinstance(spec, AttentionHeads):
        names += [spec.k, spec.v]
    return {n: getattr(module, n) for n in names}


def _units(spec, linears: dict) -> int:
    """Units of the module as it is now (channels: the consumer's input width / 1; heads: q's)."""
    if isinstance(spec, AttentionHeads):
        return spec.heads
    return linears[shrink.consumer(spec)].in_features


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


#: config fields holding an MLP's intermediate width (Llama/Mistral/Qwen, OPT)
MLP_FIELDS = ("intermediate_size", "ffn_dim")


def shrunk_config(model: nn.Module, rows: list[dict]):
    """A copy of `model.config` describing the shrunk model, when one exists: every structured row
    of a kind keeps the same width, and the model class built from the new config (on the meta
    device) has exactly the model's parameter shapes. None otherwise — non-uniform widths, a bias
    FLAP added to o_proj / down_proj, or a family whose config cannot say it (OPT's head_dim =
    hidden / heads): such a folder loads with `load_pruned` only."""
    import copy

    config = getattr(model, "config", None)
    rows = [r for r in rows if r.get("technique") == "StructuredConfig"]
    if config is None or not rows:
        return None
    widths, heads = set(), set()
    for row in rows:
        spec = row.get("spec") or {"kind": "gated"}
        if spec.get("kind") == "heads":
            heads.add((row["kept"], row["kv_kept"], spec["head_dim"]))
        else:
            widths.add(row["kept"])
    if len(widths) > 1 or len(heads) > 1:
        return None
    new = copy.deepcopy(config)
    if widths:
        fields = [f for f in MLP_FIELDS if isinstance(getattr(config, f, None), int)]
        if not fields:
            return None
        setattr(new, fields[0], widths.pop())
    if heads:
        n, kv, dim = heads.pop()
        for field, value in (("num_attention_heads", n), ("num_key_value_heads", kv), ("head_dim", dim)):
            setattr(new, field, value)
    try:
        with torch.device("meta"):
            built = type(model)(new)
    except Exception:  # noqa: BLE001  (a config the class rejects: no plain config for this model)
        return None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return new if {k: tuple(v.shape) for k, v in built.state_dict().items()} == want else None

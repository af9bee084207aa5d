"""Module rewrites: techniques that replace whole modules rather than edit a linear's weight.

A config whose TARGET is not "linear" (e.g. "gated_mlp" for CATSConfig, "attention" for the
attention forms) is carried out by a registered `ModuleRewrite`. Like a weight technique it
splits the work in two: `plan` computes a decision (a dict of tensors: a CATS threshold, an MoE
split and router) from the module and the statistics the analysis passes collected, without
changing the model; `apply` carries the decision out, recording every change in the run's
`Transaction` first, and returns the report row. `candidates` names the modules of its kind in a
captured model, `restore` re-applies the rewrite from report rows when a checkpoint is loaded.
The pipeline (passes/transform/rewrite.py) runs rewrites block by block: `first` ones (the
attention forms) at the start of the block, before it is calibrated, the others after its
pruning, in increasing `order`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .configs import SparsityConfig, Technique, technique_for
from ..errors import RecipeError
from .targeting import DEFAULT, key_matches

#: set on each module a rewrite replaced or changed: the config that did it (a second is refused)
REWRITTEN = "sparsecc_rewritten"


class ModuleRewrite(Technique):
    """Base of the techniques that replace modules; subclasses are registered with
    `configs.register_technique(ConfigType)` like any technique."""

    #: what the candidates are, for error messages ("gated MLP (down(act(gate(x)) * up(x)))")
    what: str = "module"
    #: applied at the start of its block, before the block's statistics are collected
    first: bool = False
    #: rewrites of one stage run in increasing order
    order: int = 0
    #: replaces the module's linears by new ones (shrunk, split): refused on quantized linears,
    #: whose grids the new ones would not carry
    rebuilds_linears: bool = False

    def compile_error(self, config: SparsityConfig) -> str | None:
        return super().compile_error(config) or f"{type(config).__name__} replaces modules, which torch.compile cannot do"

    def candidates(self, captured) -> dict[str, Any]:
        """{module name: spec} of the modules of this kind in the captured model."""
        raise NotImplementedError

    def spec_to_dict(self, spec) -> Any:
        """The spec as JSON data (for plans)."""
        return spec.to_dict() if hasattr(spec, "to_dict") else spec

    def spec_from_dict(self, data) -> Any:
        return data

    def check(self, config: SparsityConfig, model: nn.Module, name: str, spec) -> None:
        """Raise RecipeError if module `name` cannot take `config` (called before any work)."""

    def plan(self, config: SparsityConfig, model: nn.Module, name: str, spec, stats: dict) -> dict[str, torch.Tensor]:
        """The decision for module `name` (data-free rewrites decide nothing: {})."""
        return {}

    def check_decision(self, config: SparsityConfig, spec, decision: dict) -> str | None:
        """What is wrong with a decision read from a plan file (None: nothing)."""
        return None

    def apply(self, config: SparsityConfig, model: nn.Module, name: str, spec, decision: dict, tx) -> dict:
        """Rewrite module `name` as decided, each change recorded in `tx` first; returns its report row."""
        raise NotImplementedError

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        """Re-apply the rewrite from this technique's report rows (checking before changing)."""
        raise NotImplementedError


def is_rewrite(config: SparsityConfig | None) -> bool:
    return config is not None and isinstance(technique_for(config), ModuleRewrite)


def rewrite_candidates(recipe: dict, captured, model_name: str) -> dict[str, list[str]]:
    """{target kind: candidate names} for the module-rewrite configs in a recipe. A key covering a
    module that is already rewritten, or a kind with no candidate in the model, is an error."""
    done = {n: m.__dict__[REWRITTEN] for n, m in captured.model.named_modules() if REWRITTEN in m.__dict__}
    kinds: dict[str, list[str]] = {}
    for key, cfg in recipe.items():
        if not is_rewrite(cfg):
            continue
        tech = technique_for(cfg)
        if cfg.TARGET not in kinds:
            kinds[cfg.TARGET] = list(tech.candidates(captured))
        # a rewritten module is no candidate any more (a CATS MLP is no gated MLP; after one
        # attention rewrite no layer calls SDPA): name it rather than say the model has none
        same = [n for n, c in done.items() if c.TARGET == cfg.TARGET]
        again = [n for n in same if key != DEFAULT and key_matches(key, n)] or ([] if kinds[cfg.TARGET] else same)
        if again:
            raise RecipeError(f"recipe[{key!r}]: {again[0]} is already rewritten by {type(done[again[0]]).__name__}; "
                              "modules are rewritten once: load the model again and put all its rewrites in one recipe")
        if not kinds[cfg.TARGET]:
            raise RecipeError(f"{model_name} has no {tech.what} for {type(cfg).__name__}; remove it from the recipe")
    return kinds


def hidden_linears(model: nn.Module, seen) -> dict[str, str]:
    """{name: why} of the nn.Linears inside rewritten modules that capture did not see (`seen`):
    the rewrite runs them inside one op (a CATS MLP), so a later recipe cannot prune them."""
    out = {}
    for owner, module in model.named_modules():
        cfg = module.__dict__.get(REWRITTEN)
        if cfg is None:
            continue
        for sub, lin in module.named_modules(prefix=owner):
            if isinstance(lin, nn.Linear) and sub not in seen:
                out[sub] = f"inside {owner}, rewritten by {type(cfg).__name__}"
    return out


def mark(model: nn.Module, name: str, config: SparsityConfig, tx=None) -> None:
    """Record on module `name` that `config` rewrote it (undone with `tx`)."""
    module = model.get_submodule(name)
    if tx is not None:
        tx.on_undo(lambda: module.__dict__.pop(REWRITTEN, None))
    setattr(module, REWRITTEN, config)


def restore_rewrites(model: nn.Module, rows: list[dict]) -> list[str]:
    """Re-apply the module rewrites recorded in report rows (a loaded checkpoint)."""
    from .configs import config_from_dict

    done, by_tech = [], {}
    for row in rows:
        cfg = config_from_dict(row["config"]) if isinstance(row.get("config"), dict) else None
        if is_rewrite(cfg):
            tech = technique_for(cfg)
            by_tech.setdefault(id(tech), (tech, []))[1].append(row)
    for tech, tech_rows in sorted(by_tech.values(), key=lambda g: g[0].order):
        done.extend(tech.restore(model, tech_rows))
        for r in tech_rows:
            mark(model, r["module"], config_from_dict(r["config"]))
    return done


def is_rewrite_row(row: dict) -> bool:
    """Whether a report row records a module rewrite (no weight of its own to save or count)."""
    from .configs import config_from_dict

    return isinstance(row.get("config"), dict) and is_rewrite(config_from_dict(row["config"]))


@torch.no_grad()
def observe(model: nn.Module, module_type: type, make_hook, batches, config_name: str) -> None:
    """Run `batches` through `model` with `make_hook(name, ctx)` as a forward hook on every module
    of `module_type`; ctx["mask"] is the current batch's token mask (None: all tokens count)."""
    from ..graph.calibration import token_mask, validate_batches
    from ..graph.capture import forward_model

    batches = validate_batches(model, batches)
    ctx: dict = {}
    handles = [mod.register_forward_hook(make_hook(name, ctx)) for name, mod in model.named_modules()
               if isinstance(mod, module_type)]
    if not handles:
        raise RecipeError(f"the model has no {module_type.__name__} modules: sparsify_ it with a {config_name} first")
    try:
        for batch in batches:
            ctx["mask"] = token_mask(batch)
            forward_model(model, batch)
    finally:
        for h in handles:
            h.remove()

"""From a recipe, or a Plan, to passes.

A recipe: resolve its keys on the captured model, check everything that can be checked before any
work, and list the passes its configs need, in the order they run per block:

    rewrite_module_forms (attention forms) -> input statistics, Hessians -> apply_recipe (pruning)
    -> gate activations, router statistics -> rewrite_modules (CATS, MoE)

plus OWL's whole-model outlier pass, which runs over every block before any is pruned.

A Plan: the same transform passes, given the plan's decisions; the model is checked against the
plan (sites, shapes, fingerprints of the weights it was calibrated on) before anything changes.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import CalibrationError, PlanError, RecipeError
from ..graph.calibration import token_mask
from ..graph.capture import Captured, capture
from ..techniques.configs import technique_for
from ..techniques.packing import compressed_linears
from ..techniques.pruning import check_finite
from ..techniques.quantization import check_no_grids, check_quantizable
from ..techniques.rewrites import REWRITTEN, ModuleRewrite, hidden_linears, rewrite_candidates
from ..techniques.targeting import key_matches, normalize_recipe, resolve
from .analysis import PRODUCERS
from .memory import check_hessian_memory
from .transform import ApplyRecipe, RewriteModules


def covering_key(names: list[str]) -> str:
    """A recipe key covering all `names`: the modules below the first one's parent, its numbers
    generalised ('re:model\\.layers\\.\\d+\\.mlp\\..*'), where that covers them all; else the first name."""
    parent = re.escape(names[0].rsplit(".", 1)[0]).replace(r"\_", "_")
    key = "re:" + re.sub(r"\d+", r"\\d+", parent) + r"\..*"
    return key if all(key_matches(key, n) for n in names) else names[0]


def recipe_stages(recipe) -> list[dict]:
    """The recipe split by technique `stage`, in the order the stages run: a stage is resolved on the
    model the stages before it left (LayerDropConfig, stage -1, renumbers the blocks, so the rest of
    the recipe names modules after the drop). Skips (None) go with the last stage."""
    recipe = normalize_recipe(recipe)
    stages = sorted({technique_for(c).stage for c in recipe.values() if c is not None}) or [0]
    return [{k: c for k, c in recipe.items()
             if (technique_for(c).stage == s if c is not None else s == stages[-1])} for s in stages]


def recipe_passes(model: nn.Module, recipe, batches: list, data: bool = True, captured=None):
    """(captured model, passes) carrying out `recipe`; raises before any work on a bad recipe.
    `captured`: the model captured already (weights still on the meta device are checked when loaded)."""
    recipe = normalize_recipe(recipe)
    if len(recipe_stages(recipe)) > 1:
        first = next(c for c in recipe.values() if c is not None and technique_for(c).stage < 0)
        raise RecipeError(f"{type(first).__name__} runs before the rest of a recipe, which is resolved on the model "
                          f"it leaves: sparsify_ and calibrate split the recipe; build one Pipeline per stage "
                          f"(passes.build.recipe_stages)")
    captured = captured or capture(model, batches[0])
    kinds = {"linear": list(captured.sites), **rewrite_candidates(recipe, captured, type(model).__name__)}
    # linears capture cannot prune (compressed; run inside a rewritten module's op): resolve them
    # too, so that a recipe reaching them fails instead of skipping them
    packed = compressed_linears(model)
    hidden = hidden_linears(model, captured.sites)
    assignments = resolve(recipe, {**kinds, "linear": kinds["linear"] + list(packed) + list(hidden)})
    hit = [n for n in packed if n in assignments]
    if hit:
        more = f" and {len(hit) - 3} more" if len(hit) > 3 else ""
        raise RecipeError(f"{', '.join(hit[:3])}{more} {'is' if len(hit) == 1 else 'are'} compressed "
                          f"({', '.join(sorted({packed[n] for n in hit}))}), with no nn.Linear weight to prune: "
                          "prune before compressing, or load the uncompressed model")
    hit = [n for n in hidden if n in assignments]
    if hit:
        raise RecipeError(f"{hit[0]}{f' and {len(hit) - 1} more' if len(hit) > 1 else ''} cannot be pruned now: "
                          f"{hidden[hit[0]]}, which runs it inside one op; put the pruning in the recipe that "
                          f"rewrites (pruning runs first), or skip them with {{{covering_key(hit)!r}: None}}")
    linears = {n: c for n, c in assignments.items() if not isinstance(technique_for(c), ModuleRewrite)}
    modules = {n: c for n, c in assignments.items() if n not in linears}
    for name in linears:  # before any work (OWL, Hessians, the calibration forward)
        if not captured.sites[name].weight(model).is_meta:  # onloading checks its weights as it reads them
            check_finite(name, captured.sites[name].weight(model))
        check_quantizable(model, name, linears[name], captured.sites[name].in_features)
    if not data:
        needy = [f"{n} ({type(c).__name__})" for n, c in assignments.items() if technique_for(c).needs_data(c)]
        if needy:
            raise CalibrationError(f"the recipe needs calibration data for {', '.join(needy[:3])}"
                                   f"{' ...' if len(needy) > 3 else ''}; pass batches=...")
    _check_padding(modules, batches, data)
    hessians = [n for n, c in linears.items() if "hessian" in technique_for(c).needs(c)]
    if hessians:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        check_hessian_memory(captured, hessians, device, hessian_bytes=8)  # fp64 accumulators (analysis/hessian.py)

    specs, candidates = {}, {}
    for name, cfg in modules.items():
        tech = technique_for(cfg)
        if id(tech) not in candidates:
            candidates[id(tech)] = tech.candidates(captured)
        specs[name] = candidates[id(tech)][name]
        if tech.rebuilds_linears:
            check_no_grids(model, name, type(cfg).__name__)
        tech.check(cfg, model, name, specs[name])
    targets = {n: (c, captured.sites[n]) for n, c in linears.items()} | {n: (c, specs[n]) for n, c in modules.items()}
    needs: dict[str, dict] = {}
    for name, (cfg, target) in targets.items():
        for art in technique_for(cfg).needs(cfg):
            needs.setdefault(art, {})[name] = (cfg, target)
    unknown = sorted(set(needs) - set(PRODUCERS))
    if unknown:
        raise RecipeError(f"no analysis pass produces {unknown[0]!r}, which "
                          f"{type(next(iter(needs[unknown[0]].values()))[0]).__name__} needs")
    analysis = [PRODUCERS[art].from_targets(needs[art]) for art in PRODUCERS if art in needs]
    return captured, _transforms(linears, modules, specs, analysis)


def _transforms(linears: dict, modules: dict, specs: dict, analysis: list, decisions: dict | None = None) -> list:
    """The pass list: the block's attention forms, the analysis passes, pruning, the other rewrites."""
    first = {n: c for n, c in modules.items() if technique_for(c).first}
    late = {n: c for n, c in modules.items() if n not in first}
    passes = [RewriteModules(first, {n: specs[n] for n in first}, first=True, decisions=decisions)] if first else []
    passes += [*analysis, ApplyRecipe(linears, decisions=decisions)]
    if late:
        passes.append(RewriteModules(late, {n: specs[n] for n in late}, decisions=decisions))
    return passes


def plan_passes(model: nn.Module, plan, strict: bool = True):
    """(captured, passes) replaying `plan` (an io.Plan) on `model`, the model checked first."""
    linears = {n: c for n, c in plan.configs.items() if n in plan.sites}
    modules = {n: c for n, c in plan.configs.items() if n not in plan.sites}
    specs = {n: technique_for(c).spec_from_dict(plan.modules[n]) for n, c in modules.items()}
    prints = plan.meta.get("fingerprints", {})
    for name, config in linears.items():
        site = plan.sites[name]
        try:
            weight = site.weight(model)
        except AttributeError:
            packed = compressed_linears(model).get(name)
            raise PlanError(f"plan targets {site.param}, which this model does not have"
                            + (f" ({name} is compressed, {packed}: apply the plan before compressing)"
                               if packed else "")) from None
        if tuple(weight.shape) != (site.out_features, site.in_features):
            raise PlanError(f"{name}: plan expects [{site.out_features}, {site.in_features}], "
                            f"model has {list(weight.shape)}")
        check_finite(name, weight)
        check_quantizable(model, name, config, site.in_features)
        _check_fingerprint(name, fingerprint(weight), prints, strict)
    for name, config in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PlanError(f"plan rewrites {name} ({type(config).__name__}), which this model does not have") \
                from None
        done = module.__dict__.get(REWRITTEN)
        if done is not None:
            raise PlanError(f"{name} is already rewritten by {type(done).__name__}; apply the plan to the model "
                            "it was calibrated on, loaded again")
        technique_for(config).check(config, model, name, specs[name])
        _check_fingerprint(name, module_fingerprint(module), prints, strict)
    return Captured(model, [], dict(plan.sites)), _transforms(linears, modules, specs, [], plan.decisions)


def fingerprint(w: torch.Tensor) -> list[float]:
    """Cheap identity check of a weight: (sum, sum of squares) in fp64."""
    w = w.detach().double()
    return [float(w.sum()), float((w * w).sum())]


def module_fingerprint(module: nn.Module) -> list[float]:
    """The fingerprint of all of a module's parameters together, one parameter in fp64 at a time (a
    whole stack of decoder blocks is fingerprinted too, by LayerDropConfig)."""
    prints = [fingerprint(p) for p in module.parameters()]
    return [sum(f[0] for f in prints), sum(f[1] for f in prints)]


def _check_fingerprint(name: str, found: list[float], prints: dict, strict: bool) -> None:
    expected = prints.get(name)
    if strict and expected and not all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
                                       for a, b in zip(found, expected)):
        raise PlanError(f"{name}: weights differ from those the plan was calibrated on (already "
                        "sparsified, or another checkpoint?); pass strict=False to apply anyway")


def _check_padding(modules: dict, batches: list, data: bool) -> None:
    """The attention forms take token positions from token indices: refuse padded calibration batches
    (their forward would attend the padding), as the rewritten model refuses them."""
    forms = [n for n, c in modules.items() if technique_for(c).first]
    if data and forms and any(m is not None and not bool(m.all()) for m in map(token_mask, batches)):
        raise CalibrationError(f"padded calibration batches cannot calibrate a model with the attention form of "
                               f"{forms[0]} (positions are token indices): use one unpadded sequence per row")

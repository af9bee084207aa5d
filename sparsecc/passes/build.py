"""From a recipe to passes: resolve its keys on the captured model, check everything that can be
checked before any work, and list the passes its configs need, in the order they run per block:

    rewrite_module_forms (attention forms) -> input statistics, Hessians -> apply_recipe (pruning)
    -> gate activations, router statistics -> rewrite_modules (CATS, MoE)

plus OWL's whole-model outlier pass, which runs over every block before any is pruned.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import CalibrationError, RecipeError
from ..graph.calibration import token_mask
from ..graph.capture import capture
from ..techniques.configs import technique_for
from ..techniques.packing import compressed_linears
from ..techniques.pruning import check_finite
from ..techniques.rewrites import ModuleRewrite, hidden_linears, rewrite_candidates
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


def recipe_passes(model: nn.Module, recipe, batches: list, data: bool = True):
    """(captured model, passes) carrying out `recipe`; raises before any work on a bad recipe."""
    captured = capture(model, batches[0])
    recipe = normalize_recipe(recipe)
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
        check_finite(name, captured.sites[name].weight(model))
    if not data:
        needy = [f"{n} ({type(c).__name__})" for n, c in assignments.items() if technique_for(c).needs_data(c)]
        if needy:
            raise CalibrationError(f"the recipe needs calibration data for {', '.join(needy[:3])}"
                                   f"{' ...' if len(needy) > 3 else ''}; pass batches=...")
    _check_padding(modules, batches, data)
    hessians = [n for n, c in linears.items() if "hessian" in technique_for(c).needs(c)]
    if hessians:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        check_hessian_memory(captured, hessians, device)

    specs, candidates = {}, {}
    for name, cfg in modules.items():
        tech = technique_for(cfg)
        if id(tech) not in candidates:
            candidates[id(tech)] = tech.candidates(captured)
        specs[name] = candidates[id(tech)][name]
        tech.check(cfg, model, name, specs[name])
    targets = {n: (c, captured.sites[n]) for n, c in linears.items()} | {n: (c, specs[n]) for n, c in modules.items()}
    needs: dict[str, dict] = {}
    for name, (cfg, target) in targets.items():
        for art in technique_for(cfg).needs(cfg):
            needs.setdefault(art, {})[name] = (cfg, target)
    first = {n: c for n, c in modules.items() if technique_for(c).first}
    passes = []
    if first:
        passes.append(RewriteModules(first, {n: specs[n] for n in first}, first=True))
    passes += [PRODUCERS[art].from_targets(needs[art]) for art in PRODUCERS if art in needs]
    unknown = sorted(set(needs) - set(PRODUCERS))
    if unknown:
        raise RecipeError(f"no analysis pass produces {unknown[0]!r}, which "
                          f"{type(next(iter(needs[unknown[0]].values()))[0]).__name__} needs")
    passes.append(ApplyRecipe(linears))
    late = {n: c for n, c in modules.items() if n not in first}
    if late:
        passes.append(RewriteModules(late, {n: specs[n] for n in late}))
    return captured, passes


def _check_padding(modules: dict, batches: list, data: bool) -> None:
    """The attention forms take token positions from token indices: refuse padded calibration batches
    (their forward would attend the padding), as the rewritten model refuses them."""
    forms = [n for n, c in modules.items() if technique_for(c).first]
    if data and forms and any(m is not None and not bool(m.all()) for m in map(token_mask, batches)):
        raise CalibrationError(f"padded calibration batches cannot calibrate a model with the attention form of "
                               f"{forms[0]} (positions are token indices): use one unpadded sequence per row")

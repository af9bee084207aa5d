"""The public verbs: `calibrate` (analysis only -> Plan) and `sparsify_` (in place -> Report)."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from . import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from .calibration import describe, validate_batches
from .capture import capture
from .compressed import compressed_linears
from .configs import technique_for
from .errors import CalibrationError, PlanError, RecipeError
from .passes.base import ANALYSIS_PRODUCERS, ApplyRecipe
from .passes.blockwise import forward_model
from .passes.pipeline import Pipeline
from .plan import Plan, fingerprint, plan_meta
from .report import Report
from .layerwise import owl_sparsities_for
from .memory import check_hessian_memory
from .targeting import key_matches, normalize_recipe, resolve
from .techniques.pruning import check_finite
from .rewrites import RewriteContext, apply_rewrites, hidden_linears, is_rewrite, rewrite_candidates


def _example_batch(model: nn.Module):
    """A dummy batch for data-free work on language models (token ids only need a valid range)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise CalibrationError(f"{type(model).__name__} takes no token ids, so sparsecc cannot make an input "
                               "to capture it: pass batches=[example_input]")
    return torch.zeros(1, 8, dtype=torch.long, device=emb.weight.device)


def _covering_key(names: list[str]) -> str:
    """A recipe key covering all `names`: the modules below the first one's parent, its numbers
    generalised ('re:model\\.layers\\.\\d+\\.mlp\\..*'), where that covers them all; else the first name."""
    parent = re.escape(names[0].rsplit(".", 1)[0]).replace(r"\_", "_")
    key = "re:" + re.sub(r"\d+", r"\\d+", parent) + r"\..*"
    return key if all(key_matches(key, n) for n in names) else names[0]


def _build(model, recipe, batches, debug, progress, data: bool = True):
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
                          f"rewrites (pruning runs first), or skip them with {{{_covering_key(hit)!r}: None}}")
    modules = {n: c for n, c in assignments.items() if is_rewrite(c)}  # module rewrites (rewrites.py)
    assignments = {n: c for n, c in assignments.items() if not is_rewrite(c)}
    for name in assignments:  # before any work (OWL, Hessians, the calibration forward)
        check_finite(name, captured.sites[name].weight(model))
    if not data:
        needy = [f"{n} ({type(c).__name__})" for n, c in {**assignments, **modules}.items()
                 if technique_for(c).needs_data(c)]
        if needy:
            raise CalibrationError(f"the recipe needs calibration data for {', '.join(needy[:3])}"
                                   f"{' ...' if len(needy) > 3 else ''}; pass batches=...")
    needs = sorted({r for c in assignments.values() for r in technique_for(c).requires})
    if "hessian" in needs:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        check_hessian_memory(captured, [n for n, c in assignments.items() if "hessian" in technique_for(c).requires],
                             device)
    passes = [ANALYSIS_PRODUCERS[a](modules=[n for n, c in assignments.items() if a in technique_for(c).requires])
              for a in needs]
    overrides = owl_sparsities_for(model, captured, assignments, batches, progress) if data else {}
    passes.append(ApplyRecipe(assignments, overrides))
    return captured, assignments, modules, Pipeline(passes, debug=debug, progress=progress)


def calibrate(model: nn.Module, batches, recipe, *, debug: bool = False, progress: bool = True,
              keep_hessians: bool = False) -> Plan:
    """Run the analysis passes the recipe needs and compute every decision, block by block on
    the outputs of the already-transformed blocks, then restore the model: it is unchanged,
    and the returned Plan holds what `sparsify_(model, plan)` needs to apply without data."""
    batches_list = validate_batches(model, batches)
    was_training = model.training
    model.eval()
    try:
        captured, assignments, modules, pipe = _build(model, recipe, batches_list, debug, progress)
        if modules:
            raise RecipeError(f"calibrate/Plan cover weight pruning; {type(next(iter(modules.values()))).__name__} "
                              f"rewrites modules ({next(iter(modules))}): apply it with sparsecc.sparsify_(model, "
                              "recipe, batches)")
        meta = plan_meta(model, {n: captured.sites[n] for n in assignments})
    finally:
        model.train(was_training)
    result = pipe.run(model, batches_list, captured=captured, keep_changes=False)
    stats = {a: t for a, t in result.stats.items() if keep_hessians or a != "hessian"}
    setup = describe(batches_list, getattr(batches, "setup", None))
    meta["timings"] = result.timings
    return Plan({n: captured.sites[n] for n in assignments}, assignments, result.decisions, stats, setup,
                result.rows, meta)


def sparsify_(model: nn.Module, recipe_or_plan, batches=None, *, debug: bool = False, progress: bool = True,
              strict: bool = True) -> Report:
    """Sparsify `model` in place.

    With a recipe ({module name | "re:<regex>" | "default": config or None}), runs the passes the
    configs need on `batches` (data-free configs need none). With a Plan from `calibrate`,
    replays its decisions without data; `strict` checks the weights are those it was made from.
    A failure leaves the model as it was.
    """
    if isinstance(recipe_or_plan, Plan):
        return _apply_plan(model, recipe_or_plan, strict)
    if batches is None:
        batches_list = [_example_batch(model)]
        setup = {"data": "none (data-free)"}
    else:
        batches_list = validate_batches(model, batches)
        setup = None
    was_training = model.training
    model.eval()
    try:
        captured, assignments, modules, pipe = _build(model, recipe_or_plan, batches_list, debug, progress,
                                                      data=batches is not None)
    finally:
        model.train(was_training)
    def rewrite(ctx):  # module rewrites after the weights are pruned, inside the pipeline's undo scope
        ctx.rows.extend(apply_rewrites(RewriteContext(model, captured, batches_list, forward_model,
                                                      ctx.on_restore, progress), modules))
    result = pipe.run(model, batches_list, captured=captured, then=rewrite if modules else None)
    setup = setup or describe(batches_list, getattr(batches, "setup", None))
    return Report(result.rows, setup, result.timings, result.scopes)


@torch.no_grad()
def _apply_plan(model: nn.Module, plan: Plan, strict: bool) -> Report:
    for name in plan.decisions:  # check everything before changing anything
        site = plan.sites[name]
        try:
            weight = site.weight(model)
        except AttributeError:
            packed = compressed_linears(model).get(name)
            raise PlanError(f"plan targets {site.param}, which this model does not have"
                            + (f" ({name} is compressed, {packed}: apply the plan before compressing)" if packed else "")
                            ) from None
        if tuple(weight.shape) != (site.out_features, site.in_features):
            raise PlanError(f"{name}: plan expects [{site.out_features}, {site.in_features}], "
                            f"model has {list(weight.shape)}")
        check_finite(name, weight)
        expected = plan.meta.get("fingerprints", {}).get(name)
        if strict and expected and not all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
                                           for a, b in zip(fingerprint(weight), expected)):
            raise PlanError(f"{name}: weights differ from those the plan was calibrated on (already "
                            "sparsified, or another checkpoint?); pass strict=False to apply anyway")
    saved: dict[str, torch.Tensor] = {}
    rows = []
    try:
        for name, decision in plan.decisions.items():  # in the order they were made
            site, config = plan.sites[name], plan.configs[name]
            tech = technique_for(config)
            for param in tech.touches(config, site, decision):
                saved.setdefault(param, model.get_parameter(param).detach().clone())
            tech.apply(config, model, site, decision)
            row = next((r for r in plan.rows if r["module"] == name), {"module": name, "param": site.param,
                       "transposed": site.transposed, "technique":
                       type(config).__name__, "config": config.to_dict(),
                       "shape": [site.out_features, site.in_features], "seconds": 0.0})
            rows.append({**row, "sparsity": float((site.weight(model) == 0).float().mean())})
    except BaseException:
        for param, value in saved.items():
            model.get_parameter(param).copy_(value)
        raise
    return Report(rows, plan.setup, {}, ["plan"])

"""The public verbs: `calibrate` (analysis only -> Plan) and `sparsify_` (in place -> Report).

Both build the one `Pipeline` from a recipe (passes/build.py); `calibrate` runs it and undoes
every change, keeping the decisions in a Plan; `sparsify_(model, plan)` replays a Plan's
decisions through the same transform passes, without data.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from .errors import CalibrationError, PlanError
from .graph.calibration import describe, validate_batches
from .graph.capture import Captured
from .io.plan import Plan, fingerprint, module_weights, plan_meta
from .io.report import Report
from .passes.pipeline import Pipeline
from .passes.transform import ApplyRecipe, RewriteModules
from .techniques.configs import technique_for
from .techniques.packing import compressed_linears
from .techniques.pruning import check_finite
from .techniques.rewrites import ModuleRewrite


def _example_batch(model: nn.Module):
    """A dummy batch for data-free work on language models (token ids only need a valid range)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise CalibrationError(f"{type(model).__name__} takes no token ids, so sparsecc cannot make an input "
                               "to capture it: pass batches=[example_input]")
    return torch.zeros(1, 8, dtype=torch.long, device=emb.weight.device)


def _pipeline(model, recipe, batches_list, debug, progress, data=True) -> Pipeline:
    was_training = model.training
    model.eval()
    try:
        return Pipeline.from_recipe(model, recipe, batches_list, data=data, debug=debug, progress=progress)
    finally:
        model.train(was_training)


def calibrate(model: nn.Module, batches, recipe, *, debug: bool = False, progress: bool = True,
              keep_hessians: bool = False) -> Plan:
    """Run the analysis passes the recipe needs and compute every decision, block by block on
    the outputs of the already-transformed blocks, then undo every change: the model is
    unchanged, and the returned Plan holds what `sparsify_(model, plan)` needs to apply without
    data (masks and updated weights, CATS thresholds, MoE splits and routers, attention forms)."""
    batches_list = validate_batches(model, batches)
    pipe = _pipeline(model, recipe, batches_list, debug, progress)
    meta = plan_meta(model, pipe.captured.sites, pipe.targets)
    result = pipe.run(model, batches_list, keep_changes=False)
    keep = {"input_stats", "layer_sparsity"} | ({"hessian"} if keep_hessians else set())
    meta["timings"] = result.timings
    return Plan.from_result(result, meta, stats={a: t for a, t in result.stats.items() if a in keep},
                            setup=describe(batches_list, getattr(batches, "setup", None)))


def sparsify_(model: nn.Module, recipe_or_plan, batches=None, *, debug: bool = False, progress: bool = True,
              strict: bool = True) -> Report:
    """Sparsify `model` in place.

    With a recipe ({module name | "re:<regex>" | "default": config or None}), runs the passes the
    configs need on `batches` (data-free configs need none). With a Plan from `calibrate`,
    replays its decisions without data; `strict` checks the weights are those it was made from.
    A failure leaves the model as it was.
    """
    if isinstance(recipe_or_plan, Plan):
        return _apply_plan(model, recipe_or_plan, strict, debug)
    if batches is None:
        batches_list = [_example_batch(model)]
        setup = {"data": "none (data-free)"}
    else:
        batches_list = validate_batches(model, batches)
        setup = describe(batches_list, getattr(batches, "setup", None))
    pipe = _pipeline(model, recipe_or_plan, batches_list, debug, progress, data=batches is not None)
    result = pipe.run(model, batches_list)
    return Report(result.rows, setup, result.timings, result.scopes)


def _apply_plan(model: nn.Module, plan: Plan, strict: bool, debug: bool) -> Report:
    _check_plan(model, plan, strict)
    linears = {n: c for n, c in plan.configs.items() if n in plan.sites}
    modules = {n: c for n, c in plan.configs.items() if n not in plan.sites}
    specs = {n: technique_for(c).spec_from_dict(plan.modules[n]) for n, c in modules.items()}
    first = {n: c for n, c in modules.items() if technique_for(c).first}
    late = {n: c for n, c in modules.items() if n not in first}
    passes = [ApplyRecipe(linears, decisions=plan.decisions)]
    if first:
        passes.append(RewriteModules(first, {n: specs[n] for n in first}, first=True, decisions=plan.decisions))
    if late:
        passes.append(RewriteModules(late, {n: specs[n] for n in late}, decisions=plan.decisions))
    result = Pipeline(passes, debug=debug, progress=False).run(model, None, captured=Captured(model, [], plan.sites))
    calibrated = {r["module"]: r for r in plan.rows}
    rows = [{**calibrated.get(r["module"], r), "sparsity": r["sparsity"], "seconds": r["seconds"]}
            if r.get("param") else r for r in result.rows]
    return Report(rows, plan.setup, result.timings, ["plan"])


@torch.no_grad()
def _check_plan(model: nn.Module, plan: Plan, strict: bool) -> None:
    """Everything a plan needs of the model, checked before anything changes."""
    prints = plan.meta.get("fingerprints", {})
    for name, config in plan.configs.items():
        if name in plan.sites:
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
        else:
            try:
                weight = module_weights(model.get_submodule(name))
            except AttributeError:
                raise PlanError(f"plan rewrites {name} ({type(config).__name__}), which this model does not "
                                "have") from None
            if not isinstance(technique_for(config), ModuleRewrite):
                raise PlanError(f"plan: {name} has a {type(config).__name__} but no linear site")
        expected = prints.get(name)
        if strict and expected and not all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
                                           for a, b in zip(fingerprint(weight), expected)):
            raise PlanError(f"{name}: weights differ from those the plan was calibrated on (already "
                            "sparsified, or another checkpoint?); pass strict=False to apply anyway")


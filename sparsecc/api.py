"""The public verbs: `calibrate` (analysis only -> Plan) and `sparsify_` (in place -> Report).

Both build the one `Pipeline` from a recipe (passes/build.py); `calibrate` runs it and undoes
every change, keeping the decisions in a Plan; `sparsify_(model, plan)` replays a Plan's
decisions through the same transform passes, without data.
"""
from __future__ import annotations

import torch
from torch import nn

from . import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from .errors import CalibrationError
from .graph.calibration import describe, validate_batches
from .io.plan import Plan, plan_meta
from .io.report import Report
from .passes.pipeline import Pipeline


def _example_batch(model: nn.Module):
    """A dummy batch for data-free work on language models (token ids only need a valid range)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise CalibrationError(f"{type(model).__name__} takes no token ids, so sparsecc cannot make an input "
                               "to capture it: pass batches=[example_input]")
    return torch.zeros(1, 8, dtype=torch.long, device=emb.weight.device)


def calibrate(model: nn.Module, batches, recipe, *, debug: bool = False, progress: bool = True,
              keep_hessians: bool = False) -> Plan:
    """Run the analysis passes the recipe needs and compute every decision, block by block on
    the outputs of the already-transformed blocks, then undo every change: the model is
    unchanged, and the returned Plan holds what `sparsify_(model, plan)` needs to apply without
    data (masks and updated weights, CATS thresholds, MoE splits and routers, attention forms)."""
    batches_list = validate_batches(model, batches)
    pipe = Pipeline.from_recipe(model, recipe, batches_list, debug=debug, progress=progress)
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
    pipe = Pipeline.from_recipe(model, recipe_or_plan, batches_list, data=batches is not None, debug=debug,
                                progress=progress)
    result = pipe.run(model, batches_list)
    return Report(result.rows, setup, result.timings, result.scopes)


def _apply_plan(model: nn.Module, plan: Plan, strict: bool, debug: bool) -> Report:
    result = Pipeline.from_plan(model, plan, strict=strict, debug=debug).run(model, None)
    calibrated = {r["module"]: r for r in plan.rows}
    rows = {r["module"]: {**calibrated.get(r["module"], r), "sparsity": r["sparsity"], "seconds": r["seconds"]}
            if r.get("param") else r for r in result.rows}
    order = [n for n in plan.decisions if n in rows]  # the order calibration made them (block by block)
    return Report([rows[n] for n in order], plan.setup, result.timings, ["plan"])

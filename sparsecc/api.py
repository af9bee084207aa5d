"""The public verbs: `calibrate` (analysis only -> Plan) and `sparsify_` (in place -> Report).

Both build the one `Pipeline` from a recipe (passes/build.py); `calibrate` runs it and undoes
every change, keeping the decisions in a Plan; `sparsify_(model, plan)` replays a Plan's
decisions through the same transform passes, without data. A recipe with a LayerDropConfig runs in
two stages (`recipe_stages`): the blocks are dropped first, then the rest is resolved and calibrated
on the renumbered model; one Transaction spans the stages, so a failure in either undoes both, and a
Plan replays them in the same order (`Plan.stages`).
"""
from __future__ import annotations

import torch
from torch import nn

from . import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from .errors import CalibrationError
from .graph.calibration import describe, validate_batches
from .io.plan import Plan, plan_meta
from .io.report import Report
from .passes.build import recipe_stages
from .passes.pipeline import Pipeline
from .techniques.transaction import Transaction


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
    keep = {"input_stats", "layer_sparsity"} | ({"hessian"} if keep_hessians else set())
    setup = describe(batches_list, getattr(batches, "setup", None))

    def stage(part, tx):
        pipe = Pipeline.from_recipe(model, part, batches_list, debug=debug, progress=progress)
        meta = plan_meta(model, pipe.captured.sites, pipe.targets)
        result = pipe.run(model, batches_list, tx=tx)
        meta["timings"] = result.timings
        return Plan.from_result(result, meta, stats={a: t for a, t in result.stats.items() if a in keep}, setup=setup)

    return Plan.combine(_in_stages(model, recipe_stages(recipe), stage, keep_changes=False))


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

    def stage(part, tx):
        pipe = Pipeline.from_recipe(model, part, batches_list, data=batches is not None, debug=debug,
                                    progress=progress)
        return pipe.run(model, batches_list, tx=tx)

    results = _in_stages(model, recipe_stages(recipe_or_plan), stage)
    return Report([r for res in results for r in res.rows], setup, _timings(results),
                  [s for res in results for s in res.scopes])


def _apply_plan(model: nn.Module, plan: Plan, strict: bool, debug: bool) -> Report:
    results = _in_stages(model, plan.stages(), lambda part, tx: Pipeline.from_plan(
        model, part, strict=strict, debug=debug).run(model, None, tx=tx))
    calibrated = {r["module"]: r for r in plan.rows}
    rows = {r["module"]: {**calibrated.get(r["module"], r), "sparsity": r["sparsity"], "seconds": r["seconds"]}
            if r.get("param") else r for res in results for r in res.rows}
    order = [n for n in plan.decisions if n in rows]  # the order calibration made them (block by block)
    return Report([rows[n] for n in order], plan.setup, _timings(results), ["plan"])


def _in_stages(model: nn.Module, stages: list, run_stage, keep_changes: bool = True) -> list:
    """[run_stage(stage, tx) for each stage], in order, each on the model the stages before it left.
    One Transaction spans them: a failure in any stage, or keep_changes=False, undoes every stage."""
    tx = Transaction(model)
    try:
        out = [run_stage(stage, tx) for stage in stages]
    except BaseException:
        tx.rollback()
        raise
    if keep_changes:
        tx.commit()
    else:
        tx.rollback()
    return out


def _timings(results) -> dict[str, float]:
    """Per-pass seconds, summed over the stages' pipelines."""
    out: dict[str, float] = {}
    for res in results:
        for name, secs in res.timings.items():
            out[name] = out.get(name, 0.0) + secs
    return out

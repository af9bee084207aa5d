"""The public verbs: `calibrate` (analysis only -> Plan) and `sparsify_` (in place -> Report).

Both build the one `Pipeline` from a recipe (passes/build.py); `calibrate` runs it and undoes
every change, keeping the decisions in a Plan; `sparsify_(model, plan)` replays a Plan's
decisions through the same transform passes, without data. A recipe with a LayerDropConfig runs in
two stages (`recipe_stages`): the blocks are dropped first, then the rest is resolved and calibrated
on the renumbered model; one Transaction spans the stages, so a failure in either undoes both, and a
Plan replays them in the same order (`Plan.stages`).
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from . import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from .errors import CalibrationError
from .graph.calibration import describe, validate_batches
from .io.plan import Plan, plan_meta
from .io.report import Report
from .passes.build import recipe_stages
from .passes.distributed import Comm, current_comm
from .passes.pipeline import Pipeline
from .techniques.transaction import Transaction


def _example_batch(model: nn.Module):
    """A dummy batch for data-free work on language models (token ids only need a valid range)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise CalibrationError(f"{type(model).__name__} takes no token ids, so sparsecc cannot make an input "
                               "to capture it: pass batches=[example_input]")
    return torch.zeros(1, 8, dtype=torch.long, device="cpu" if emb.weight.is_meta else emb.weight.device)


def calibrate(model: nn.Module, batches, recipe, *, debug: bool = False, progress: bool = True,
              keep_hessians: bool = False) -> Plan:
    """Run the analysis passes the recipe needs and compute every decision, block by block on
    the outputs of the already-transformed blocks, then undo every change: the model is
    unchanged, and the returned Plan holds what `sparsify_(model, plan)` needs to apply without
    data (masks and updated weights, CATS thresholds, MoE splits and routers, attention forms).
    Inside a torch.distributed process group, every rank calls it with the same batches: see
    `sparsify_`."""
    comm = current_comm()
    batches_list, local, ids = _shared_batches(model, batches, comm)
    keep = {"input_stats", "layer_sparsity"} | ({"hessian"} if keep_hessians else set())
    setup = describe(batches_list, getattr(batches, "setup", None))

    def stage(part, tx):
        pipe = Pipeline.from_recipe(model, part, batches_list, debug=debug, progress=progress)
        pipe.keep = keep | {"decisions"}  # a block's other statistics go once it is done
        meta = plan_meta(model, pipe.captured.sites, pipe.targets)
        result = pipe.run(model, local, tx=tx, comm=comm, batch_ids=ids)
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

    Inside an initialised torch.distributed process group of N > 1 ranks (gloo, NCCL), every rank
    calls it with the same model and the same full list of batches: each rank calibrates on its
    slice of them, the statistics are reduced exactly and each linear is planned by one rank, and
    every rank ends with the model one process makes, bit for bit (passes/distributed.py; a pass
    that cannot be reduced yet raises DistributedError).
    """
    if isinstance(recipe_or_plan, Plan):
        return _apply_plan(model, recipe_or_plan, strict, debug)
    comm = current_comm()
    if batches is None:
        batches_list = local = [_example_batch(model)]
        ids = None
        setup = {"data": "none (data-free)"}
    else:
        batches_list, local, ids = _shared_batches(model, batches, comm)
        setup = describe(batches_list, getattr(batches, "setup", None))

    def stage(part, tx):
        pipe = Pipeline.from_recipe(model, part, batches_list, data=batches is not None, debug=debug,
                                    progress=progress)
        pipe.keep = set()  # the report is made of rows: a block's statistics and decisions go once it is done
        return pipe.run(model, local, tx=tx, comm=comm, batch_ids=ids)

    results = _in_stages(model, recipe_stages(recipe_or_plan), stage)
    return Report([r for res in results for r in res.rows], setup, _timings(results),
                  [s for res in results for s in res.scopes])


def _shared_batches(model: nn.Module, batches, comm: Comm) -> tuple[list, list, list[int]]:
    """(every batch, this rank's share, their global indices), checked on every rank first: one
    rank's bad batch fails them all (none waits for it)."""
    try:
        batches_list = validate_batches(model, batches)
    except Exception as e:
        comm.agree(False, "checking the calibration batches", f"{type(e).__name__}: {e}")
        raise
    comm.agree(True, "checking the calibration batches")
    ids = comm.shard(batches_list)
    return batches_list, [batches_list[i] for i in ids], ids


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


def prune_folder(model_dir, recipe, batches, out, *, tokenizer=None, compress: bool = False, max_memory=None,
                 activations: str = "memory", offload_folder=None, device=None, overwrite: bool = False,
                 progress: bool = True, before_publish=None) -> Report:
    """Prune the transformers model in folder `model_dir` into folder `out` without loading it whole
    (sequential onloading): the model is built on the meta device, and each decoder block is read
    from the weight files (memory-mapped), calibrated on the outputs of the blocks already pruned,
    pruned, written as one shard of `out` and freed. Peak memory is one block, its statistics and
    the calibration activations, whatever the depth; `max_memory` (bytes or "24GiB") refuses a run
    whose estimate exceeds it before any weight is read. `activations` keeps the calibration hidden
    states between blocks "memory" (as computed), "bf16"/"fp16" (half of fp32's bytes; statistics of
    the rounded inputs) or "disk" (one file per batch in `offload_folder`, else a temporary folder;
    one batch in memory at a time, the same checkpoint). `device` ("cuda", "cuda:1"; default the CPU)
    is where each block is read to and calibrated, with its statistics, the activations and the
    parts outside the blocks (read there for the probe and the end only); the batches may be on the
    CPU; `max_memory` then budgets that device. The checkpoint equals `sparsify_` +
    `save_pruned` of the whole model (tensor for tensor; its files are split by block; config.json
    says the new widths where structured pruning left them uniform), and `out` is written all or
    nothing. Block by block run: the per-block linear techniques (magnitude, Wanda, SparseGPT, OBS,
    GPTQ, RTN; N:M; joint quantization); the module rewrites (CATS, MoEConfig with a fitted or
    centroid router, StructuredConfig on MLP channels and attention heads or key/value groups with
    score "magnitude", "wanda-sp" or "flap" and update None or "refit", the attention forms), each
    rewritten module written with its block and freed with it; and the whole-model decisions made
    from one block at a time (OWL's per-block sparsities, layerwise="owl"; StructuredConfig's global
    widths, layerwise="global"): a first sweep reads every block, observes it on the dense hidden
    states and frees it unwritten, the second prunes and writes. Recipes that need the whole model
    at once are refused by name (WholeModelError): LayerDropConfig (it drops and renumbers blocks),
    StructuredConfig(score="bonsai") (forwards of the whole model per sample) and L0Config (gates
    trained over the whole model); so are folders whose weights transformers converts as it loads
    them (Mixtral's experts; SparseMoEConfig's models). `batches=None`: data-free recipes
    (magnitude, the attention forms, MoE's centroid router). `before_publish(report)` runs once the folder is
    complete, before it is moved into place (the command line stages its JSON report there)."""
    from .errors import WholeModelError
    from .graph.capture import capture
    from .io.checkpoint import checkpoint_meta, write_meta
    from .io.folders import check_output_dir, writing_folder
    from .io.lazy import WHOLE_MODEL, LazyModel
    from .io.onload import BlockFiles
    from .passes.memory import fmt_bytes, map_large_allocations, onload_peak_bytes, parse_bytes
    from .passes.activations import Activations, check_activations
    from .passes.transform import RewriteModules
    from .techniques.configs import technique_for
    from .techniques.structured import shrunk_config

    out = Path(out)
    check_output_dir(out, overwrite)
    check_activations(activations, offload_folder)
    device = _onload_device(device)
    budget = parse_bytes(max_memory) if max_memory is not None else None
    lazy = LazyModel(model_dir, device)
    model = lazy.model
    data = batches is not None
    comm = current_comm()
    batches_list, local, ids = _shared_batches(model, batches, comm) if data else ([_example_batch(model)], None, None)
    if data and device.type != "cpu":  # checked as given (the model is on meta), then moved where it runs
        batches_list = [_to_device(b, device) for b in batches_list]
        local = [batches_list[i] for i in ids]
    setup = describe(batches_list, getattr(batches, "setup", None)) if data else {"data": "none (data-free)"}
    whole = WHOLE_MODEL
    if len(recipe_stages(recipe)) > 1:
        raise WholeModelError(f"LayerDropConfig cannot run block by block (it drops whole blocks and renumbers the "
                              f"rest, in a recipe stage of its own): {whole}")
    captured = capture(model, {**_on_meta(batches_list[0]), "use_cache": False})
    pipe = Pipeline.from_recipe(model, recipe, batches_list, data=data, progress=progress, captured=captured)
    _check_blockwise(pipe, captured, whole)
    blocks = captured.blocks
    if not blocks:
        raise WholeModelError(f"{type(model).__name__} has no decoder blocks to load one at a time: {whole}")
    hessians = [n for n, c in pipe.targets.items() if "hessian" in technique_for(c).needs(c)]
    outliers = [n for n, c in pipe.targets.items() if "layer_sparsity" in technique_for(c).needs(c)]  # OWL's
    pruned = {n: c for n, c in pipe.targets.items() if n not in hessians}
    rewrites = {n: (c, p.specs[n]) for p in pipe.order if isinstance(p, RewriteModules) for n, c in p.targets.items()}
    act_bytes = max((p.dtype.itemsize for p in model.parameters() if p.is_floating_point()), default=4)
    need, parts = onload_peak_bytes(captured, hessians, {b: lazy.nbytes(b) for b in blocks},
                                    lazy.nbytes(outside=tuple(blocks)), batches_list, act_bytes,
                                    activations=activations, outlier_names=outliers, rewrites=rewrites,
                                    pruned=pruned)
    if budget is not None and need > budget:
        detail = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items() if k not in ("block", "phase"))
        disk = "keep the activations on disk (activations='disk'; --activations disk)"
        fix = (f"{disk}, or leave out layerwise='owl' (its outlier ratio scores the weights of a block's largest linear at once)"
               if parts["phase"].startswith("OWL's outlier ratio") else
               f"lower the number or length of the calibration samples, {disk}"
               + (", or use WandaConfig (no Hessians)" if hessians else ""))
        raise CalibrationError(f"pruning {lazy.path} block by block needs ~{fmt_bytes(need)} at its peak "
                               f"({parts['block']}, {parts['phase']}: {detail}), more than max_memory "
                               f"{fmt_bytes(budget)}; {fix}")
    map_large_allocations()  # keeps the resident set flat over the blocks (passes/memory.py)
    lazy.materialise("", outside=tuple(blocks))
    # Under torch.distributed every rank loads and calibrates each block on its share of the batches;
    # rank 0 alone writes, and publishes the folder only once every rank has finished.
    with (writing_folder(out) if comm.rank == 0 else nullcontext()) as tmp:
        files = BlockFiles(lazy, blocks, tmp, compress)
        pipe.source, pipe.keep = files, set()
        pipe.activations = Activations(activations, offload_folder)
        result = pipe.run(model, local, comm=comm, batch_ids=ids)
        report = Report(result.rows, setup, result.timings, result.scopes)
        try:
            if tmp is not None:
                fields = files.finish([r for r in result.rows if captured.block_of(r["module"] + ".") is None])
                # uniformly shrunk (structured): a config of the new widths, as save_pruned writes
                (shrunk_config(model, result.rows) or model.config).save_pretrained(tmp)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                write_meta(tmp, checkpoint_meta(model, report, recipe) | fields)
                if before_publish is not None:
                    before_publish(report)
        except BaseException as e:
            comm.agree(False, "writing the checkpoint", f"{type(e).__name__}: {e}")
            raise
        comm.agree(True, "writing the checkpoint")
    return report


def _check_blockwise(pipe: Pipeline, captured, whole: str) -> None:
    """Refuse by name (WholeModelError) a recipe whose passes cannot run one block at a time: those
    needing the whole model at once (Bonsai's sub-model forwards, L0's gate training, LayerDrop's
    block scores), and rewrites of modules outside the decoder blocks (LayerDrop's stack of blocks).
    The per-block statistics and transforms (pruning, module rewrites) run block by block, and the
    whole-model first sweeps that score one block at a time (OWL's outlier ratios, the global widths
    of structured pruning) read each block, observe it and free it unwritten before the sweep that writes."""
    from .errors import WholeModelError
    from .passes.analysis import (CollectBlockInfluence, CollectChannelStats, CollectGateActivations, CollectHessians,
                                  CollectInputStats, CollectOutlierRatios, CollectRouterStats, CollectUnitBudget,
                                  CollectUnitGates, CollectUnitRelevance)
    from .passes.transform import ApplyRecipe, RewriteModules
    from .techniques.configs import technique_for

    allowed = (ApplyRecipe, RewriteModules, CollectHessians, CollectInputStats, CollectOutlierRatios,
               CollectGateActivations, CollectRouterStats, CollectChannelStats, CollectUnitBudget)
    why = {CollectUnitRelevance: "its relevance takes forwards of the whole model per sample",
           CollectUnitGates: "it trains gates over the whole model",
           CollectBlockInfluence: "it scores whole blocks, to drop them and renumber the rest"}

    def named(c) -> str:  # the config, with its score where not the default (Bonsai's: the whole model's)
        default = {f.name: f.default for f in dataclasses.fields(c)}.get("score", getattr(c, "score", None))
        return type(c).__name__ + (f"(score={c.score!r})" if getattr(c, "score", None) != default else "")

    for p in pipe.order:
        outside = [n for n in (p.targets or {}) if captured.block_of(n + ".") is None] \
            if isinstance(p, RewriteModules) else []
        if isinstance(p, allowed) and not outside:
            continue
        if outside:
            raise WholeModelError(f"{named(p.targets[outside[0]])} ({p.name}) cannot run block by block: it rewrites "
                                  f"{outside[0]}, which is no part of one decoder block; {whole}")
        # name the configs needing it: those it rewrites, or whose statistics it collects
        what = sorted({named(c) for n, c in pipe.targets.items() if n in (getattr(p, "targets", None) or {})
                       or set(technique_for(c).needs(c)) & set(p.produces)})
        raise WholeModelError(f"{', '.join(what)} ({p.name}) cannot run block by block "
                              f"({why.get(type(p), 'it needs the whole model')}): {whole}")


def _onload_device(device) -> torch.device:
    """prune_folder's `device` checked: the CPU (None) or an available CUDA device."""
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is available here; leave device out to use the CPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: onloading runs on 'cpu' or 'cuda'")
    return dev


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _on_meta(batch) -> dict:
    """A batch as a dict of meta tensors: what capturing a model built on the meta device takes."""
    batch = batch if isinstance(batch, dict) else {"input_ids": batch}
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

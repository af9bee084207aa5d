"""Pipeline: order passes by what they need and produce, run them block by block, record.

    pipe = Pipeline([CollectInputStats(), CollectHessians(), ApplyRecipe(...)], debug=True)
    result = pipe.run(model, batches)     # result.stats, result.timings, result.summary()

Ordering uses networkx: an edge p -> q when q requires an artefact p produces. A requirement
nobody produces, two producers of one artefact, or a cycle is an error naming the passes.
Within each scope consecutive analysis passes share one forward over the calibration data.
If anything fails, every weight a pass changed is restored: the model is left as it was.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from tqdm.auto import tqdm

from ..calibration import describe, validate_batches
from ..capture import Captured, capture
from ..errors import CalibrationError, PipelineError
from .base import ANALYSIS_PRODUCERS, AnalysisPass, ApplyRecipe, Pass
from .blockwise import BlockRunner
from .checks import verify


@dataclass
class PassContext:
    """What passes share: the model, its capture, the batches, and everything collected."""

    model: torch.nn.Module
    captured: Captured
    batches: list
    debug: bool = False
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)       # artefact -> module -> stat
    decisions: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)                         # per-layer report rows
    originals: dict[str, torch.Tensor] = field(default_factory=dict)      # param -> value before
    on_restore: list = field(default_factory=list)                         # undo callables (module swaps)
    batch_index: int = 0
    token_mask: torch.Tensor | None = None

    def __post_init__(self):
        self.site_layout = {s.name: (tuple(s.weight(self.model).shape), s.weight(self.model).dtype,
                                     s.weight(self.model).device) for s in self.captured.sites.values()}

    def set_batch(self, index: int, mask: torch.Tensor | None) -> None:
        self.batch_index, self.token_mask = index, mask

    def save_original(self, *params) -> None:
        """Keep the current value of each parameter (a name or a site) before a pass changes it."""
        for p in params:
            name = p if isinstance(p, str) else p.param
            if name not in self.originals:
                self.originals[name] = self.model.get_parameter(name).detach().clone()

    def restore(self) -> None:
        for undo in reversed(self.on_restore):  # module swaps first, then the weights inside them
            undo()
        self.on_restore.clear()
        with torch.no_grad():
            for name, value in self.originals.items():
                self.model.get_parameter(name).copy_(value)
        self.originals.clear()

    def record(self, site, config, weight, seconds: float, error=(None, None)) -> None:
        self.rows.append({"module": site.name, "param": site.param, "transposed": site.transposed,
                          "technique": type(config).__name__,
                          "config": config.to_dict(), "shape": [site.out_features, site.in_features],
                          "sparsity": float((weight == 0).float().mean()), "error": error[0],
                          "error_kind": error[1], "seconds": seconds})


@dataclass
class PipelineResult:
    order: list[str]
    stats: dict[str, dict[str, Any]]
    decisions: dict[str, dict[str, torch.Tensor]]
    rows: list[dict]
    timings: dict[str, float]
    setup: dict
    scopes: list[str]
    sites: dict
    configs: dict = field(default_factory=dict)   # module -> config, from ApplyRecipe passes

    def save(self, path):
        """Save what every pass collected (and any decisions) as a Plan: JSON + safetensors."""
        from ..plan import Plan

        return Plan(self.sites, self.configs, self.decisions, self.stats, self.setup, self.rows,
                    {"timings": self.timings, "order": self.order}).save(path)

    def summary(self) -> str:
        lines = [f"pipeline: {' -> '.join(self.order)}",
                 f"scopes: {len(self.scopes)} ({'block-sequential' if len(self.scopes) > 1 else 'whole model'})"]
        lines += [f"  {name:<28} {secs:8.3f} s" for name, secs in self.timings.items()]
        for art, table in self.stats.items():
            lines.append(f"collected {art} for {len(table)} modules")
        if self.rows:
            lines.append(f"transformed {len(self.rows)} modules")
        return "\n".join(lines)


class Pipeline:
    def __init__(self, passes: list[Pass], debug: bool = False, progress: bool = True):
        names = [p.name for p in passes]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise PipelineError(f"pass names must be unique; repeated: {sorted(dupes)}")
        self.passes = list(passes)
        self.debug = debug
        self.progress = progress
        self.order = self._order()

    def _order(self) -> list[Pass]:
        producer: dict[str, Pass] = {}
        for p in self.passes:
            for art in p.produces:
                if art in producer:
                    raise PipelineError(f"passes {producer[art].name!r} and {p.name!r} both produce {art!r}")
                producer[art] = p
        g = nx.DiGraph()
        g.add_nodes_from(range(len(self.passes)))
        index = {id(p): i for i, p in enumerate(self.passes)}
        for i, p in enumerate(self.passes):
            for art in p.requires:
                if art not in producer:
                    fix = ANALYSIS_PRODUCERS.get(art)
                    hint = f"; add {fix.__name__}() to the pipeline" if fix else ""
                    raise PipelineError(f"pass {p.name!r} needs {art!r} but no pass in the pipeline produces it{hint}")
                g.add_edge(index[id(producer[art])], i)
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            return [self.passes[i] for i in nx.lexicographical_topological_sort(g)]
        a, b = self.passes[cycle[0][0]].name, self.passes[cycle[0][1]].name
        raise PipelineError(f"passes {a!r} and {b!r} depend on each other (cycle: "
                            f"{' -> '.join(self.passes[u].name for u, _ in cycle)} -> {a})")

    def run(self, model: torch.nn.Module, batches, captured: Captured | None = None,
            keep_changes: bool = True, then=None) -> PipelineResult:
        """Run on `model` with calibration `batches`. keep_changes=False restores the weights
        afterwards (what `calibrate` does); on any error they are always restored. `then(ctx)`, if
        given, runs after the passes, still inside that guarantee (module rewrites register their
        undo in ctx.on_restore)."""
        batches_list = validate_batches(model, batches)
        was_training = model.training
        model.eval()
        ctx = None
        try:
            captured = captured or capture(model, batches_list[0])
            ctx = PassContext(model, captured, batches_list, self.debug)
            timings = self._run(ctx)
            if then is not None:
                t0 = time.perf_counter()
                then(ctx)
                timings["module rewrites"] = time.perf_counter() - t0
            result = PipelineResult([p.name for p in self.order], ctx.stats, ctx.decisions, ctx.rows, timings,
                                    describe(batches_list, getattr(batches, "setup", None)),
                                    self._scopes, dict(captured.sites),
                                    {n: c for p in self.order if isinstance(p, ApplyRecipe) for n, c in p.assignments.items()})
            if not keep_changes:
                ctx.restore()
            return result
        except BaseException:
            if ctx is not None:
                ctx.restore()
            raise
        finally:
            model.train(was_training)

    def _run(self, ctx: PassContext) -> dict[str, float]:
        timings = {p.name: 0.0 for p in self.order}
        timings["calibration forward"] = 0.0
        for p in self.order:
            if isinstance(p, AnalysisPass):
                p.setup(ctx)
        stages: list[list[Pass]] = []
        for p in self.order:  # consecutive analysis passes share one forward
            if stages and isinstance(p, AnalysisPass) and isinstance(stages[-1][0], AnalysisPass):
                stages[-1].append(p)
            else:
                stages.append([p])
        relevant: set[str] | None = set()
        for p in self.order:
            if isinstance(p, AnalysisPass):
                relevant |= p._wanted
            elif isinstance(p, ApplyRecipe):
                relevant |= set(p.assignments)
            else:
                relevant = None  # a custom transform may touch any site
                break
        runner = BlockRunner(ctx, needs_data=any(isinstance(p, AnalysisPass) for p in self.order), relevant=relevant)
        self._scopes = []
        done: list[str] = []
        total = runner.num_scopes()  # 0 for a recipe of module rewrites only: no bar then
        bar = tqdm(runner.scopes(), total=total, desc="sparsecc", unit="block", disable=not self.progress or not total,
                   leave=False)
        for scope in bar:
            bar.set_postfix_str(scope.name)
            self._scopes.append(scope.name)
            done_here: list[str] = []
            for stage in stages:
                try:
                    if isinstance(stage[0], AnalysisPass):
                        t = time.perf_counter()
                        spent = _observe(ctx, scope, stage)
                        timings["calibration forward"] += time.perf_counter() - t - sum(spent.values())
                        for name, s in spent.items():
                            timings[name] += s
                    else:
                        t = time.perf_counter()
                        stage[0].run(ctx, scope.sites)
                        timings[stage[0].name] += time.perf_counter() - t
                except Exception as e:
                    names = ", ".join(p.name for p in stage)
                    e.add_note(f"sparsecc: pass {names} failed on {scope.name} (passes run before it: "
                               f"{', '.join(done_here + done[-3:]) or 'none'}); the model was restored")
                    raise
                done_here += [p.name for p in stage]
                if ctx.debug:
                    problems = verify(ctx)
                    if problems:
                        raise PipelineError(f"check failed after pass {stage[-1].name!r} on {scope.name} "
                                            f"(passes run before it: {', '.join(done_here[:-1]) or 'none'}): "
                                            + "; ".join(problems))
            done = done_here
        return timings


def _observe(ctx: PassContext, scope, stage: list[AnalysisPass]) -> dict[str, float]:
    """Run the scope once with hooks feeding each site's input to the stage's passes."""
    spent = {p.name: 0.0 for p in stage}
    handles = []
    for site in scope.sites:
        passes = [p for p in stage if p.wants(site.name)]
        if not passes:
            continue

        def hook(mod, args, site=site, passes=passes):
            x = args[0]
            if x.shape[-1] != site.in_features:
                raise PipelineError(f"{site.name}: its input has {x.shape[-1]} features but its weight expects "
                                    f"{site.in_features}; this module cannot be calibrated by input hooks")
            if ctx.token_mask is not None and x.dim() >= 3 and x.shape[:2] == ctx.token_mask.shape:
                x = x[ctx.token_mask]
            x = x.reshape(-1, site.in_features)
            if not torch.isfinite(x).all():
                raise CalibrationError(f"NaN/Inf in the input of {site.name} on calibration batch {ctx.batch_index}; "
                                       "check the batch and the layers before this module")
            for p in passes:
                t = time.perf_counter()
                p.observe(ctx, site, x)
                spent[p.name] += time.perf_counter() - t
        handles.append(ctx.model.get_submodule(site.name).register_forward_pre_hook(hook))
    try:
        scope.run()
    finally:
        for h in handles:
            h.remove()
    return spent

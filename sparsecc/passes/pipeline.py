"""Pipeline: order passes by what they need and produce, run them block by block, record.

    pipe = Pipeline.from_recipe(model, recipe, batches)   # the passes a recipe needs (build.py)
    pipe = Pipeline([CollectInputStats(), CollectHessians(), ApplyRecipe(...)], debug=True)
    result = pipe.run(model, batches)     # result.stats, result.timings, result.summary()

Ordering uses networkx: an edge p -> q when q requires an artefact p produces, or runs `after`
one. A requirement nobody produces, two producers of one artefact, or a cycle is an error
naming the passes. Whole-model analysis passes (OWL's) run in a first sweep over every scope;
the rest in a second, scope by scope, consecutive analysis passes sharing one forward. Every
change is recorded in one Transaction: if anything fails (or `keep_changes=False`, what
`calibrate` asks) the model is left as it was.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from tqdm.auto import tqdm

from ..errors import CalibrationError, PipelineError
from ..graph.calibration import describe, validate_batches
from ..graph.capture import Captured, capture
from ..prune.masks import zero_share
from ..techniques.transaction import Transaction
from .activations import Activations
from .analysis import PRODUCERS
from .base import AnalysisPass, Pass, TransformPass
from .blockwise import BlockRunner, slot_value, hidden_of, hidden_slot
from .build import plan_passes, recipe_passes
from .checks import verify
from .distributed import Comm
from .memory import return_freed_memory


@dataclass
class PassContext:
    """What passes share: the model, its capture, the batches, and everything collected."""

    model: torch.nn.Module
    captured: Captured
    batches: list
    debug: bool = False
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)       # artefact -> module -> stat
    decisions: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    configs: dict = field(default_factory=dict)                            # module -> the config applied
    specs: dict = field(default_factory=dict)                              # rewritten module -> its spec
    rows: list[dict] = field(default_factory=list)                         # per-module report rows
    batch_index: int = 0
    token_mask: torch.Tensor | None = None
    comm: Comm = field(default_factory=Comm)   # the ranks of a distributed run (passes/distributed.py)
    batch_ids: list[int] | None = None         # the global index of each of `batches` (None: 0, 1, ...)
    source: Any = None                         # onloading: where the blocks come from (Pipeline.source)
    keep: set[str] | None = None               # what is kept of a finished block (Pipeline.keep)
    later: set[str] = field(default_factory=set)  # artefacts that passes after the running one need
    activations: Activations = field(default_factory=Activations)  # how hidden states are kept (activations.py)

    def __post_init__(self):
        self.tx = Transaction(self.model)
        if self.batch_ids is None:
            self.batch_ids = list(range(len(self.batches)))
        self.site_layout = {s.name: (tuple(s.weight(self.model).shape), s.weight(self.model).dtype,
                                     s.weight(self.model).device) for s in self.captured.sites.values()}

    def set_batch(self, index: int, mask: torch.Tensor | None) -> None:
        self.batch_index, self.token_mask = index, mask

    @property
    def global_batch(self) -> int:
        """The index of the current batch in the whole calibration set (ranks hold slices of it)."""
        return self.batch_ids[self.batch_index]

    def save_original(self, *params) -> None:
        """Keep the current value of each parameter (a name or a site) before a pass changes it."""
        self.tx.save(*params)

    def forget(self, holds, keep=frozenset()) -> None:
        """Drop what the run holds for the modules `holds(name)` accepts, once their decoder block is
        done: their statistics (but the artefacts named in `keep`) and decisions (unless "decisions"
        is in `keep`). A 7B model's Hessians are ~55 GiB over its 32 blocks: one block's at a time."""
        tables = [t for art, t in self.stats.items() if art not in keep]
        for table in tables + ([] if "decisions" in keep else [self.decisions]):
            for name in [n for n in table if holds(n)]:
                del table[name]
        return_freed_memory()

    def done_with(self, name: str, artefacts) -> None:
        """Drop module `name`'s statistics `artefacts` once its transform has used them, when the run
        keeps none of them (`keep`) and no later pass needs them: a block's Hessians go one by one
        as its linears are solved, not all at the block's end."""
        if any([self.stats.get(art, {}).pop(name, None) is not None for art in artefacts if self.drops(art)]):
            return_freed_memory()

    def drops(self, artefact: str) -> bool:
        """Whether the running transform is the last user of `artefact` (see done_with)."""
        return self.keep is not None and artefact not in self.keep and artefact not in self.later

    def record(self, site, config, weight, seconds: float, error=(None, None)) -> None:
        self.rows.append({"module": site.name, "param": site.param, "transposed": site.transposed,
                          "technique": type(config).__name__,
                          "config": config.to_dict(), "shape": [site.out_features, site.in_features],
                          "sparsity": zero_share(weight), "error": error[0],
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
    configs: dict = field(default_factory=dict)   # module -> the config applied (linears and rewritten modules)
    specs: dict = field(default_factory=dict)     # rewritten module -> its spec (RewriteModules passes)

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
        self.captured: Captured | None = None  # set by from_recipe / from_plan
        self.source = None  # onloading: where the decoder blocks come from and go (blockwise.BlockRunner)
        #: what a run keeps of each decoder block once it is done (artefact names, "decisions"); the
        #: rest is dropped block by block (None: keep everything, e.g. to read result.stats)
        self.keep: set[str] | None = None
        self.activations = Activations()  # how block-sequential runs keep the hidden states (activations.py)

    @classmethod
    def from_recipe(cls, model: torch.nn.Module, recipe, batches, *, data: bool = True, debug: bool = False,
                    progress: bool = True, captured: Captured | None = None) -> "Pipeline":
        """The pipeline carrying out `recipe` on `model`: every analysis pass its configs need, the
        pruning and the module rewrites (build.py). With `data=False` (a data-free recipe) `batches`
        is one example input, only used to capture the model; `captured`: a capture made already
        (a model on the meta device is captured on a meta batch)."""
        batches = validate_batches(model, batches)
        was_training = model.training
        model.eval()
        try:
            captured, passes = recipe_passes(model, recipe, batches, data, captured)
        finally:
            model.train(was_training)
        pipe = cls(passes, debug=debug, progress=progress)
        pipe.captured = captured
        return pipe

    @classmethod
    def from_plan(cls, model: torch.nn.Module, plan, *, strict: bool = True, debug: bool = False) -> "Pipeline":
        """The transform passes replaying a Plan's decisions on `model`, without data; everything the
        plan needs of the model is checked first (build.py)."""
        captured, passes = plan_passes(model, plan, strict)
        pipe = cls(passes, debug=debug, progress=False)
        pipe.captured = captured
        return pipe

    @property
    def targets(self) -> dict:
        """{module: config} of every linear and module the transforms say they change (in pass order)."""
        return {n: c for p in self.order if isinstance(p, TransformPass) for n, c in (p.targets or {}).items()}

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
                    fix = PRODUCERS.get(art)
                    hint = f"; add {fix.__name__}() to the pipeline" if fix else ""
                    raise PipelineError(f"pass {p.name!r} needs {art!r} but no pass in the pipeline produces it{hint}")
                g.add_edge(index[id(producer[art])], i)
            for art in p.after:
                if art in producer and producer[art] is not p:
                    g.add_edge(index[id(producer[art])], i)
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            order = [self.passes[i] for i in nx.lexicographical_topological_sort(g)]
        else:
            a, b = self.passes[cycle[0][0]].name, self.passes[cycle[0][1]].name
            raise PipelineError(f"passes {a!r} and {b!r} depend on each other (cycle: "
                                f"{' -> '.join(self.passes[u].name for u, _ in cycle)} -> {a})")
        whole = [p for p in order if getattr(p, "whole_model", False)]
        made = {a for p in whole for a in p.produces}
        for p in whole:
            late = [a for a in p.requires if a not in made and a in producer]
            if late:
                raise PipelineError(f"whole-model pass {p.name!r} cannot need {late[0]!r}, produced block by block")
        return whole + [p for p in order if p not in whole]  # the order they run: the whole-model sweep first

    def run(self, model: torch.nn.Module, batches, captured: Captured | None = None,
            keep_changes: bool = True, tx: Transaction | None = None, *, comm: Comm | None = None,
            batch_ids: list[int] | None = None) -> PipelineResult:
        """Run on `model` with calibration `batches` (None: passes that need no data, on a given
        `captured`). keep_changes=False undoes every change afterwards (what `calibrate` does); on
        any error they are always undone. With `tx`, an open Transaction of the caller's, the run's
        changes are kept and left for `tx` to undo (its rollback undoes this run's changes first,
        then what it recorded before): how a recipe run in stages is undone as a whole."""
        if batches is None and (captured or self.captured) is None:
            raise PipelineError("Pipeline.run needs calibration batches (or a captured model, for passes that "
                                "need no data)")
        batches_list = validate_batches(model, batches) if batches is not None else []
        was_training = model.training
        model.eval()
        ctx = None
        try:
            captured = captured or self.captured or capture(model, batches_list[0])
            ctx = PassContext(model, captured, batches_list, self.debug, comm=comm or Comm(), batch_ids=batch_ids)
            ctx.source, ctx.keep, ctx.activations = self.source, self.keep, self.activations
            if self.source is not None:
                ctx.tx.unsaved = self.source.holds
            if tx is not None:  # the run keeps its own log: its parameters are saved by this stage's names
                tx.on_undo(ctx.tx.rollback)
            timings = self._run(ctx)
            result = PipelineResult([p.name for p in self.order], ctx.stats, ctx.decisions, ctx.rows, timings,
                                    describe(batches_list, getattr(batches, "setup", None)) if batches_list else {},
                                    self._scopes, dict(captured.sites), dict(ctx.configs), dict(ctx.specs))
            if tx is None and keep_changes:
                ctx.tx.commit()
            elif tx is None:
                ctx.tx.rollback()
            return result
        except BaseException:
            if ctx is not None:
                ctx.tx.rollback()
            raise
        finally:
            model.train(was_training)

    def _run(self, ctx: PassContext) -> dict[str, float]:
        timings = {p.name: 0.0 for p in self.order}
        timings["calibration forward"] = 0.0
        for p in self.order:
            if isinstance(p, AnalysisPass) and ctx.comm.world > 1 and type(p).reduce is AnalysisPass.reduce:
                p.reduce(ctx, [], ctx.comm)  # refuses (base.py), before any forward
        for p in self.order:
            if isinstance(p, AnalysisPass):
                p.setup(ctx)
        first = [p for p in self.order if getattr(p, "whole_model", False)]
        sweeps = [first, [p for p in self.order if p not in first]] if first else [self.order]
        self._scopes = []
        for sweep in sweeps:
            scopes = self._sweep(ctx, sweep, timings, "sparsecc (whole-model statistics)" if sweep is first else "sparsecc",
                                 final=sweep is sweeps[-1])
            if sweep is not first:
                self._scopes = scopes
            for p in sweep:
                if isinstance(p, AnalysisPass):
                    t = time.perf_counter()
                    p.finish(ctx)
                    timings[p.name] += time.perf_counter() - t
        return timings

    def _sweep(self, ctx: PassContext, passes: list[Pass], timings: dict, desc: str, final: bool = True) -> list[str]:
        """Run `passes` scope by scope (one decoder block at a time, then the rest); `final`: the last
        sweep (an onloading source writes its blocks; an earlier one only reads them)."""
        stages: list[list[Pass]] = []
        for p in passes:  # consecutive analysis passes share one forward
            if stages and isinstance(p, AnalysisPass) and isinstance(stages[-1][0], AnalysisPass):
                stages[-1].append(p)
            else:
                stages.append([p])
        relevant: set[str] | None = set()
        for p in passes:
            if isinstance(p, AnalysisPass):
                relevant |= p.observed | set(p.hooked_modules(ctx))
            elif p.targets is not None:
                relevant |= set(p.targets)
            else:
                relevant = None  # a transform that does not say may change any module
                break
        runner = BlockRunner(ctx, needs_data=any(isinstance(p, AnalysisPass) for p in passes), relevant=relevant,
                             done_with_blocks=any(isinstance(p, TransformPass) for p in passes), final=final)
        try:
            return self._run_scopes(ctx, runner, stages, passes, timings, desc)
        finally:
            runner.close()  # the hidden states kept (on disk: their files)

    def _run_scopes(self, ctx, runner, stages, passes, timings, desc) -> list[str]:
        scopes: list[str] = []
        done: list[str] = []
        total = runner.num_scopes()
        bar = tqdm(runner.scopes(), total=total, desc=desc, unit="block", disable=not self.progress or total < 2,
                   leave=False)
        for scope in bar:
            bar.set_postfix_str(scope.name)
            scopes.append(scope.name)
            done_here: list[str] = []
            for stage in stages:
                try:
                    if isinstance(stage[0], AnalysisPass):
                        t = time.perf_counter()
                        spent = _observe_on_ranks(ctx, scope, stage)
                        timings["calibration forward"] += time.perf_counter() - t - sum(spent.values())
                        for name, s in spent.items():
                            timings[name] += s
                        for p in stage:  # the scope's statistics over every rank's batches (distributed.py)
                            t = time.perf_counter()
                            names = [site.name for site in scope.sites if p.wants(site.name)]
                            names += [m for m in p.hooked_modules(ctx) if scope.holds(m)]
                            p.reduce(ctx, names, ctx.comm)
                            key = "reduction" if ctx.comm.world > 1 else p.name  # one process: the pass's own fold
                            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
                    else:
                        t = time.perf_counter()
                        ctx.later = {a for p in passes[passes.index(stage[0]) + 1:] for a in p.requires}
                        stage[0].run(ctx, scope.sites)
                        timings[stage[0].name] += time.perf_counter() - t
                except Exception as e:
                    names = ", ".join(p.name for p in stage)
                    e.add_note(f"sparsecc: pass {names} failed on {scope.name} (passes run before it: "
                               f"{', '.join(done[-3:] + done_here) or 'none'}); the model was restored")
                    raise
                done_here += [p.name for p in stage]
                if ctx.debug:
                    problems = verify(ctx)
                    if problems:
                        raise PipelineError(f"check failed after pass {stage[-1].name!r} on {scope.name} "
                                            f"(passes run before it: {', '.join(done_here[:-1]) or 'none'}): "
                                            + "; ".join(problems))
            done = done_here
        return scopes


def _observe_on_ranks(ctx: PassContext, scope, stage: list[AnalysisPass]) -> dict[str, float]:
    """_observe, then every rank confirms it went well: a failure on one rank's batches (NaN in
    an input) is raised on every rank, instead of the others waiting for it in the reduction."""
    try:
        spent = _observe(ctx, scope, stage)
    except Exception as e:
        ctx.comm.agree(False, f"observing {scope.name}", f"{type(e).__name__}: {e}")
        raise
    ctx.comm.agree(True, f"observing {scope.name}")
    return spent


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
                raise CalibrationError(f"NaN/Inf in the input of {site.name} on calibration batch {ctx.global_batch}; "
                                       "check the batch and the layers before this module")
            for p in passes:
                t = time.perf_counter()
                p.observe(ctx, site, x)
                spent[p.name] += time.perf_counter() - t
        handles.append(ctx.model.get_submodule(site.name).register_forward_pre_hook(hook))
    for p in stage:
        for name in p.hooked_modules(ctx):
            if not scope.holds(name):
                continue

            def module_hook(mod, args, kwargs, out, name=name, p=p):
                # the hidden state: the first argument or hidden_states=; the output, or its first
                # element (decoder blocks return a tuple or a tensor, by transformers version)
                slot = hidden_slot(args, kwargs)
                x, y = (slot_value(slot, args, kwargs) if slot else args[0]), hidden_of(out)
                if ctx.token_mask is not None and x.dim() >= 3 and x.shape[:2] == ctx.token_mask.shape:
                    x, y = x[ctx.token_mask], y[ctx.token_mask]
                t = time.perf_counter()
                p.observe_module(ctx, name, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
                spent[p.name] += time.perf_counter() - t
            handles.append(ctx.model.get_submodule(name).register_forward_hook(module_hook, with_kwargs=True))
    try:
        scope.run()
    finally:
        for h in handles:
            h.remove()
    return spent

"""The pass interface.

A pass declares the artefacts it `requires` and `produces` (strings such as "input_stats",
"hessian", "weights"), and those it should run `after` when some pass produces them (an ordering
hint that is no requirement); the Pipeline orders passes by them. Passes run scope by scope (one
decoder block at a time, see blockwise.py):
  - an AnalysisPass observes the inputs X ([tokens, in], padding removed) of the linear sites it
    wants while the scope runs on calibration data, and stores results by module name in
    `ctx.stats[artefact]` (by `reduce`, after the scope, when it combines this rank's batches
    with the other ranks' in a distributed run: passes/distributed.py); `whole_model = True`
    marks one whose results are only complete after every scope was observed (OWL's
    allocation): it runs in a first sweep, and `finish(ctx)` completes it before the
    transforms' sweep starts;
  - a TransformPass changes the model in the scope, recording every change in `ctx.tx` first.
"""
from __future__ import annotations

import torch

from ..errors import DistributedError
from ..techniques.targeting import select


class Pass:
    name: str = "pass"
    requires: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class AnalysisPass(Pass):
    """Observes linear inputs. `modules`: None for every linear site, or recipe-style keys."""

    whole_model = False
    after = ("module_forms",)  # the block's attention forms come first (passes/transform/rewrite.py)

    def __init__(self, modules=None):
        self.modules = modules
        self.observed: set[str] | None = None  # the linear sites it observes, once set up

    @classmethod
    def from_targets(cls, targets: dict) -> "AnalysisPass":
        """The pass collecting this artefact for `targets` ({module: (config, site or spec)})."""
        return cls(modules=list(targets))

    def linears(self, ctx) -> list[str]:
        """The linear sites this pass observes (the names matching `modules`)."""
        if self.modules is None:
            return list(ctx.captured.sites)
        return sorted(select(list(self.modules), list(ctx.captured.sites)))

    def setup(self, ctx) -> None:
        self.observed = set(self.linears(ctx))

    def wants(self, site: str) -> bool:
        return self.observed is None or site in self.observed

    def observe(self, ctx, site, x: torch.Tensor) -> None:
        """Called with the input x [tokens, in] of each wanted linear site."""

    def hooked_modules(self, ctx) -> list[str]:
        """Modules (any kind) whose input and output `observe_module` sees; none by default."""
        return []

    def observe_module(self, ctx, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called with the first input and the output ([tokens, features] each) of a hooked module."""

    def finish(self, ctx) -> None:
        """Called once after the last scope was observed."""

    def reduce(self, ctx, names: list[str], comm) -> None:
        """Called after each scope was observed (on this rank's batches) with the linear sites of
        the scope this pass wants, then its `hooked_modules` the scope holds (the same names in the
        same order on every rank): complete their statistics over every rank (`comm`, a
        passes.distributed.Comm), bit for bit what one process collects over all the batches.
        By default a pass has no such reduction: it refuses to run on more than one process."""
        if comm.world > 1:
            raise DistributedError(f"{self.name} cannot run on {comm.world} processes yet; run it in one process")


class TransformPass(Pass):
    #: {module: config} of what the pass changes, when it says so (the pipeline then skips scopes
    #: nothing needs); None: it may change any module
    targets: dict | None = None

    def run(self, ctx, sites) -> bool:
        """Transform what the scope holds: `sites` lists its linear sites, `sites.holds(name)` says
        whether a module lies in it; returns whether anything changed."""
        raise NotImplementedError  # abstract

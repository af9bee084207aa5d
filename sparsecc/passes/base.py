"""The pass interface, the analysis passes, and the pass that applies a recipe.

A pass declares the artefacts it `requires` and `produces` (strings such as "input_stats",
"hessian", "weights"); the Pipeline orders passes by them. Passes run scope by scope (one
decoder block at a time, see blockwise.py):
  - an AnalysisPass observes the inputs X ([tokens, in]) of the linear sites in the scope while
    the scope runs on calibration data, and stores results by module name in `ctx.stats`;
  - a TransformPass rewrites the sites of the scope and returns whether it changed anything.
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from ..configs import technique_for
from ..prune.hessian_error import relative_error
from ..targeting import select
from .stats import HessianStats, InputStats


class Pass:
    name: str = "pass"
    requires: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class AnalysisPass(Pass):
    """Observes linear inputs. `modules`: None for every linear site, or recipe-style keys."""

    def __init__(self, modules=None):
        self.modules = modules
        self._wanted: set[str] | None = None

    def setup(self, ctx) -> None:
        if self.modules is None:
            self._wanted = set(ctx.captured.sites)
        else:
            self._wanted = select(list(self.modules), list(ctx.captured.sites))

    def wants(self, site: str) -> bool:
        return self._wanted is None or site in self._wanted

    def observe(self, ctx, site, x: torch.Tensor) -> None:
        raise NotImplementedError  # abstract


class TransformPass(Pass):
    def run(self, ctx, sites: list) -> bool:
        raise NotImplementedError  # abstract


class CollectInputStats(AnalysisPass):
    """Per-linear input statistics: column L2 norms (Wanda), mean |x|, max |x|, token count."""

    name = "collect_input_stats"
    produces = ("input_stats",)

    def observe(self, ctx, site, x):
        table = ctx.stats.setdefault("input_stats", {})
        if site.name not in table:
            table[site.name] = InputStats.empty(site.in_features, x.device)
        table[site.name].update(x)


class CollectHessians(AnalysisPass):
    """Per-linear H = sum x x^T, streamed over tokens (fp32 default, fp64 option)."""

    name = "collect_hessians"
    produces = ("hessian",)

    def __init__(self, modules=None, dtype: torch.dtype = torch.float32):
        super().__init__(modules)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype

    def observe(self, ctx, site, x):
        table = ctx.stats.setdefault("hessian", {})
        if site.name not in table:
            table[site.name] = HessianStats.empty(site.in_features, self.dtype, x.device)
        table[site.name].update(x)


class ApplyRecipe(TransformPass):
    """Plan and apply each targeted site's technique, recording its decision and a report row."""

    name = "apply_recipe"
    produces = ("weights",)

    def __init__(self, assignments: dict, sparsity: dict | None = None):
        self.assignments = dict(assignments)
        self.sparsity = dict(sparsity or {})  # per-module overrides (OWL's allocation)
        self.requires = tuple(sorted({r for c in self.assignments.values() for r in technique_for(c).requires}))

    def run(self, ctx, sites):
        changed = False
        for site in sites:
            config = self.assignments.get(site.name)
            if config is None:
                continue
            if site.name in self.sparsity:
                config = dataclasses.replace(config, sparsity=self.sparsity[site.name])
            tech = technique_for(config)
            if site.tied:
                warnings.warn(f"{site.param} is tied to {', '.join(site.tied)}: rewriting {site.name} changes "
                              f"those too (skip it with {{{site.name!r}: None}} in the recipe)", stacklevel=2)
            t0 = time.perf_counter()
            stats = {k: ctx.stats[k][site.name] for k in tech.requires}
            weight = site.weight(ctx.model)
            before = weight.detach().clone()
            decision = tech.plan(config, site, weight, stats)
            ctx.save_original(*tech.touches(config, site, decision))
            tech.apply(config, ctx.model, site, decision)
            ctx.decisions[site.name] = decision
            seconds = time.perf_counter() - t0
            ctx.record(site, config, weight, seconds, error=self._error(ctx, site, before, decision))
            changed = True
        return changed


    @staticmethod
    def _error(ctx, site, before, decision):
        """Relative reconstruction error of the rewritten weight on the calibration inputs."""
        after = site.weight(ctx.model).detach()
        if "perm" in decision:  # columns were permuted: compare in the original order of the stats
            unperm = torch.empty_like(after)
            unperm[:, decision["perm"].to(after.device)] = after
            after = unperm
        hess = ctx.stats.get("hessian", {}).get(site.name)
        inp = ctx.stats.get("input_stats", {}).get(site.name)
        return relative_error(before, after, hess.xtx if hess is not None else None,
                              inp.sumsq if inp is not None else None)


ANALYSIS_PRODUCERS = {"input_stats": CollectInputStats, "hessian": CollectHessians}

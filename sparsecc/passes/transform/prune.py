"""The transform pass that prunes linears: each targeted site's weight technique, site by site."""
from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from ...prune.hessian_error import relative_error
from ...prune.quantize import grid_of
from ...techniques.configs import technique_for
from ..base import TransformPass


class ApplyRecipe(TransformPass):
    """Plan and apply each targeted linear's technique, recording its decision and a report row.
    With `decisions` (a Plan's), apply those as they are: no statistics are needed."""

    name = "apply_recipe"
    produces = ("weights",)
    after = ("module_forms",)

    def __init__(self, assignments: dict, sparsity: dict | None = None, decisions: dict | None = None):
        self.targets = dict(assignments)
        self.sparsity = dict(sparsity or {})  # per-module overrides of the configs' sparsity
        self.decisions = decisions
        self.requires = () if decisions is not None else tuple(sorted(
            {r for c in self.targets.values() for r in technique_for(c).needs(c)}))

    def run(self, ctx, sites):
        changed = False
        for site in sites:
            config = self.targets.get(site.name)
            if config is None:
                continue
            tech = technique_for(config)
            override = self.sparsity.get(site.name, ctx.stats.get("layer_sparsity", {}).get(site.name))
            if override is not None and self.decisions is None:
                config = dataclasses.replace(config, sparsity=float(override))
            if site.tied:
                warnings.warn(f"{site.param} is tied to {', '.join(site.tied)}: rewriting {site.name} changes "
                              f"those too (skip it with {{{site.name!r}: None}} in the recipe)", stacklevel=2)
            t0 = time.perf_counter()
            weight = site.weight(ctx.model)
            before = weight.detach().clone()
            if self.decisions is not None:
                decision = self.decisions[site.name]
            else:
                stats = {k: ctx.stats[k][site.name] for k in tech.needs(config)}
                if "hessian" in stats and self.decisions is None and ctx.drops("hessian"):
                    stats["hessian"].compact()  # the fp64 sums go before the solve, not after it
                # one rank plans, the others receive its decision (distributed.py); the work to spread:
                # a Hessian solve is O(in² · out) (SparseGPT Algorithm 1), the others O(in · out)
                cost = site.in_features * site.out_features * (site.in_features if "hessian" in stats else 1)
                decision = ctx.comm.decide(site.name, cost, lambda: tech.plan(config, site, weight, stats),
                                           weight.device)
            ctx.tx.save(*tech.touches(config, site, decision))
            tech.apply(config, ctx.model, site, decision, ctx.tx)
            ctx.decisions[site.name], ctx.configs[site.name] = decision, config
            seconds = time.perf_counter() - t0
            ctx.record(site, config, weight, seconds, error=self._error(ctx, site, before, decision))
            grid = grid_of(ctx.model.get_submodule(site.name))
            if grid is not None:
                ctx.rows[-1]["quant"] = grid.describe()
            if ctx.keep is not None and self.decisions is None:  # a run that keeps no block's statistics
                ctx.done_with(site.name, tech.needs(config))
                if "decisions" not in ctx.keep:  # the new weight is in the model now; the mask stays for --debug's checks
                    dropped = ("weight",) if ctx.debug else ("weight", "mask")
                    ctx.decisions[site.name] = {k: v for k, v in decision.items() if k not in dropped}
            decision = before = None  # not held through the next site's solve
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

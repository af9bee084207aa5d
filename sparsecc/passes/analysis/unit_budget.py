"""Per-module widths for structured pruning with layerwise="global" (FLAP's adaptive structure
search, An et al. 2024 §3.3), decided on the dense model before any block is pruned.

The units of all modules sharing one StructuredConfig are ranked together: each module's unit
scores (techniques/structured.py `unit_scores`, from the dense model's statistics) are
standardised, z = (s - mean) / std, and the `sparsity` share of all units with the lowest z is
removed, each module keeping at least one unit (one query head per key/value group, or one whole
group). ctx.stats["unit_sparsity"][module] = the share this module loses; the block-sequential
pass then picks which units on the pruned blocks' statistics, as with a uniform share. A module's
scores are taken when its block's scope is over (its weights loaded, its statistics folded over
the batches and ranks), but Bonsai's, which need the relevance made after the sweep.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from ...techniques.shrink import consumer
from ...techniques.structured import module_linears, unit_scores, whole_groups
from ..base import AnalysisPass
from .channel_stats import ChannelSums, consumer_width


class CollectUnitBudget(AnalysisPass):
    name = "collect_unit_budget"
    produces = ("unit_sparsity",)
    whole_model = True
    after = ()  # a first sweep over the dense model

    def __init__(self, targets: dict):
        super().__init__(modules=[])
        self.targets = dict(targets)  # {module: (StructuredConfig, spec)}
        self.requires = ("unit_relevance",) if any(c.score == "bonsai" for c, _ in self.targets.values()) else ()
        self._consumers: dict[str, str] = {}

    @classmethod
    def from_targets(cls, targets):
        return cls(targets)

    def hooked_modules(self, ctx):
        # every module scored from its own weights is reached through its consumer linear, in its
        # scope (its weights then loaded, under onloading); Bonsai's relevance comes after the sweep
        self._consumers = {f"{n}.{consumer(spec)}": n for n, (cfg, spec) in self.targets.items()
                           if cfg.score != "bonsai"}
        return list(self._consumers)

    def setup(self, ctx):
        super().setup(ctx)
        self._sums, self._scores = ChannelSums(), {}

    def observe_module(self, ctx, name, x, y):
        module = self._consumers[name]
        if self.targets[module][0].score in ("wanda-sp", "flap"):
            self._sums.add(module, ctx.global_batch, x, xtx=False)

    def reduce(self, ctx, names, comm):
        """The unit scores of the scope's modules: channel statistics over every rank's batches first."""
        for name in names:
            module = self._consumers[name]
            cfg, _ = self.targets[module]
            stats = self._sums.reduce(module, *consumer_width(ctx, name), comm, xtx=False) \
                if cfg.score in ("wanda-sp", "flap") else None
            self._scores[module] = self._score(ctx, module, {"channel_stats": stats})

    def _score(self, ctx, name, stats) -> torch.Tensor:
        cfg, spec = self.targets[name]
        return unit_scores(cfg, spec, module_linears(ctx.model, spec), stats).double().cpu()

    def finish(self, ctx):
        groups = defaultdict(list)
        for name, (cfg, spec) in self.targets.items():
            groups[cfg].append((name, spec))
        table = ctx.stats.setdefault("unit_sparsity", {})
        for cfg, members in groups.items():
            z, owner, cap = [], [], {}
            for i, (name, spec) in enumerate(members):
                score = self._scores.pop(name) if name in self._scores else \
                    self._score(ctx, name, {"unit_relevance": ctx.stats.get("unit_relevance", {}).get(name)})
                if whole_groups(cfg, spec):  # the units are whole groups
                    score = score.reshape(spec.kv_heads, -1).sum(1)
                    cap[i] = score.numel() - 1
                else:  # heads per group keep one each; channels keep one
                    cap[i] = score.numel() - (spec.kv_heads if hasattr(spec, "kv_heads") else 1)
                z.append((score - score.mean()) / score.std().clamp_min(1e-12))
                owner.append(torch.full_like(score, i, dtype=torch.long))
            z, owner = torch.cat(z), torch.cat(owner)
            budget = math.floor(z.numel() * cfg.sparsity + 0.5)
            removed = [0] * len(members)
            for i in owner[torch.argsort(z, stable=True)].tolist():  # lowest standardised score first
                if budget == 0:
                    break
                if removed[i] < cap[i]:
                    removed[i] += 1
                    budget -= 1
            for i, (name, spec) in enumerate(members):
                units = int((owner == i).sum())
                table[name] = removed[i] / units

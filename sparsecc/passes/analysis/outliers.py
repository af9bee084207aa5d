"""OWL: per-block sparsity from outlier ratios (seed 003 §4), decided before any pruning.

For the modules whose config asks layerwise="owl", ‖X_j‖₂ is collected on the dense model; the
outlier ratio D_l of block l is the fraction of Wanda scores |W_ij|·‖X_j‖₂ in the block's
targeted linears above owl_m times their mean; blocks with more outliers are pruned less
(S_l ∝ 1 − D_l, averaged to the target, within ±owl_lambda of it). Modules outside the decoder
blocks form a group each. Every block must be seen before the first is pruned: a whole-model pass.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ...prune.owl import outlier_ratio_of, owl_sparsities
from ..base import AnalysisPass
from .input_stats import InputStats


class CollectOutlierRatios(AnalysisPass):
    name = "collect_outlier_ratios"
    produces = ("layer_sparsity",)
    whole_model = True
    after = ()  # a first sweep over the dense model, before any block is transformed

    def __init__(self, configs: dict):
        super().__init__(modules=list(configs))
        self.configs = dict(configs)  # {linear: pruning config with layerwise="owl"}
        self._norms: dict[str, InputStats] = {}

    @classmethod
    def from_targets(cls, targets):
        return cls({name: cfg for name, (cfg, _) in targets.items()})

    def observe(self, ctx, site, x):
        if site.name not in self._norms:
            self._norms[site.name] = InputStats.empty(site.in_features, x.device)
        self._norms[site.name].update(x)

    def finish(self, ctx):
        """ctx.stats["layer_sparsity"][module] = the sparsity OWL allocates to its block."""
        groups: dict = defaultdict(lambda: defaultdict(list))
        for name, cfg in self.configs.items():
            k = ctx.captured.block_of(name)
            groups[cfg][ctx.captured.blocks[k] if k is not None else name].append(name)
        table = ctx.stats.setdefault("layer_sparsity", {})
        for cfg, by_group in groups.items():
            ratios, sizes = {}, {}
            for group, names in by_group.items():
                scores = []
                for n in names:
                    w = ctx.captured.sites[n].weight(ctx.model)
                    scores.append(w.abs().float() * self._norms[n].l2.to(w.device)[None, :])
                ratios[group] = outlier_ratio_of(scores, cfg.owl_m)
                sizes[group] = sum(s.numel() for s in scores)
            alloc = owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda, sizes=sizes)
            for group, names in by_group.items():
                for n in names:
                    table[n] = LayerSparsity(float(alloc[group]))
        self._norms.clear()


class LayerSparsity(float):
    """A module's allocated sparsity (a float that plans can store)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sparsity": torch.tensor(float(self), dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "LayerSparsity":
        return cls(float(t["sparsity"]))

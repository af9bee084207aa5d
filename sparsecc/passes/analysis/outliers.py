"""OWL: per-block sparsity from outlier ratios (seed 003 §4), decided before any pruning.

For the modules whose config asks layerwise="owl", ‖X_j‖₂ is collected on the dense model; the
outlier ratio D_l of block l is the fraction of Wanda scores |W_ij|·‖X_j‖₂ in the block's
targeted linears above owl_m times their mean; blocks with more outliers are pruned less
(S_l ∝ 1 − D_l, averaged to the target, within ±owl_lambda of it). Modules outside the decoder
blocks form a group each. Every block must be seen before the first is pruned: a whole-model pass.
D_l is computed when block l's scope is over (its norms folded over the batches and ranks, its
weights still loaded); the allocation, once every block was seen.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ...prune.owl import outlier_ratio_of, owl_sparsities
from ...errors import CalibrationError
from ..base import AnalysisPass
from .batch_sums import BatchSums


class CollectOutlierRatios(AnalysisPass):
    name = "collect_outlier_ratios"
    produces = ("layer_sparsity",)
    whole_model = True
    after = ()  # a first sweep over the dense model, before any block is transformed

    def __init__(self, configs: dict):
        super().__init__(modules=list(configs))
        self.configs = dict(configs)  # {linear: pruning config with layerwise="owl"}

    @classmethod
    def from_targets(cls, targets):
        return cls({name: cfg for name, (cfg, _) in targets.items()})

    def setup(self, ctx):
        super().setup(ctx)
        self._groups: dict = defaultdict(lambda: defaultdict(list))  # config -> block (or module) -> linears
        for name, cfg in self.configs.items():
            k = ctx.captured.block_of(name)
            self._groups[cfg][ctx.captured.blocks[k] if k is not None else name].append(name)
        self._sums = BatchSums()  # Σx² per input column, per batch (Wanda's ‖X_j‖₂², batch_sums.py)
        self._l2: dict[str, torch.Tensor] = {}
        self._ratios: dict = {}  # (config, group) -> (D_l, the group's weights)

    def observe(self, ctx, site, x):
        x64 = x.double()
        self._sums.add(site.name, ctx.global_batch, (x64 * x64).sum(0))

    def reduce(self, ctx, names, comm):
        """‖X_j‖₂ of the scope's linears over every rank's batches, then the outlier ratio of each
        group now complete, while its weights are loaded (onloading frees them after the scope)."""
        for name in names:
            site = ctx.captured.sites[name]
            w = site.weight(ctx.model)
            self._l2[name] = self._sums.fold(name, (site.in_features,), w.device, comm).sqrt().float()
        for cfg, by_group in self._groups.items():
            for group, members in by_group.items():
                if (cfg, group) in self._ratios or not all(n in self._l2 for n in members):
                    continue
                norms = {n: self._l2.pop(n) for n in members}

                def score(n, norms=norms):  # Wanda's A_ij = |W_ij| ‖X_j‖₂, made when needed
                    return ctx.captured.sites[n].weight(ctx.model).detach().abs().float().mul_(norms[n][None, :])
                size = sum(ctx.captured.sites[n].weight(ctx.model).numel() for n in members)
                self._ratios[cfg, group] = (outlier_ratio_of([lambda n=n: score(n) for n in members], cfg.owl_m), size)

    def finish(self, ctx):
        """ctx.stats["layer_sparsity"][module] = the sparsity OWL allocates to its block."""
        table = ctx.stats.setdefault("layer_sparsity", {})
        for cfg, by_group in self._groups.items():
            missing = [g for g in by_group if (cfg, g) not in self._ratios]
            if missing:
                raise CalibrationError(f"OWL saw no calibration input reach {missing[0]}; check that the "
                                       "calibration batches run the whole model")
            ratios = {g: self._ratios[cfg, g][0] for g in by_group}
            sizes = {g: self._ratios[cfg, g][1] for g in by_group}
            alloc = owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda, sizes=sizes)
            for group, names in by_group.items():
                for n in names:
                    table[n] = LayerSparsity(float(alloc[group]))
        self._ratios.clear()


class LayerSparsity(float):
    """A module's allocated sparsity (a float that plans can store)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sparsity": torch.tensor(float(self), dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "LayerSparsity":
        return cls(float(t["sparsity"]))

"""OWL: per-block sparsity from outlier ratios (seed 003 §4), decided before pruning.

For each config with layerwise="owl", one dense calibration pass collects ‖X_j‖₂ of its
modules; the outlier ratio D_l of block l is the fraction of Wanda scores |W_ij|·‖X_j‖₂ in the
block's targeted linears above owl_m times their mean; blocks with more outliers are pruned
less (S_l ∝ 1 − D_l, averaged to the target, within ±owl_lambda of it). Modules outside the
decoder blocks form a group each.
"""
from __future__ import annotations

from collections import defaultdict


from .prune.owl import outlier_ratio_of, owl_sparsities


def owl_sparsities_for(model, captured, assignments: dict, batches, progress: bool) -> dict[str, float]:
    """{module: allocated sparsity} for every module whose config asks for OWL."""
    from .passes import CollectInputStats, Pipeline

    owl = {n: c for n, c in assignments.items() if getattr(c, "layerwise", None) == "owl"}
    if not owl:
        return {}
    stats = Pipeline([CollectInputStats(modules=list(owl))], progress=progress).run(
        model, batches, captured=captured, keep_changes=False).stats["input_stats"]
    out: dict[str, float] = {}
    by_config: dict = defaultdict(lambda: defaultdict(list))
    for name, cfg in owl.items():
        k = captured.block_of(name)
        by_config[cfg][captured.blocks[k] if k is not None else name].append(name)
    for cfg, groups in by_config.items():
        ratios, sizes = {}, {}
        for group, names in groups.items():
            scores = []
            for n in names:
                w = captured.sites[n].weight(model)
                scores.append(w.abs().float() * stats[n].l2.to(w.device)[None, :])
            ratios[group] = outlier_ratio_of(scores, cfg.owl_m)
            sizes[group] = sum(s.numel() for s in scores)
        alloc = owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda, sizes=sizes)
        for group, names in groups.items():
            for n in names:
                out[n] = float(alloc[group])
    return out

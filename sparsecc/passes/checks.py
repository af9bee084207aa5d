"""Graph and model checks run after every pass in debug mode.

They catch a pass that broke what later passes and the compiled model rely on: every linear
keeps its shape, dtype and device, holds only finite values, honours the mask recorded for it,
and the captured FX graphs are still well formed.
"""
from __future__ import annotations

import torch


def verify(ctx) -> list[str]:
    """Return a list of problems (empty when everything holds)."""
    problems = []
    for gm in ctx.captured.graphs:
        try:
            gm.graph.lint()
        except Exception as e:  # lint raises plain RuntimeError/AssertionError subtypes
            problems.append(f"captured graph is malformed: {e}")
    for site in ctx.captured.sites.values():
        if any(site.name == m or site.name.startswith(m + ".") for m in ctx.tx.swapped):
            continue  # replaced by a rewrite (an MoE split, a shrunk linear): checked by its technique
        try:
            w = site.weight(ctx.model)
        except AttributeError:
            problems.append(f"{site.name}: its weight {site.param} is gone")
            continue
        shape, dtype, device = ctx.site_layout[site.name]
        if (tuple(w.shape), w.dtype, w.device) != (shape, dtype, device):
            problems.append(f"{site.name}: weight changed layout from {shape}/{dtype}/{device} "
                            f"to {tuple(w.shape)}/{w.dtype}/{w.device}")
            continue
        if not torch.isfinite(w).all():
            problems.append(f"{site.name}: weight holds NaN/Inf")
        mask = ctx.decisions.get(site.name, {}).get("mask")
        if mask is not None and (w[~mask.to(w.device)] != 0).any():
            problems.append(f"{site.name}: pruned entries are non-zero")
    return problems

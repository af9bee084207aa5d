"""OWL: Outlier Weighed Layerwise sparsity (Yin et al. 2023; seed 003 §4).

Outlier ratio of a layer: D_l = P(A > M * E[A]), the fraction of its Wanda scores
A_ij = |W_ij| ||X_j|| above M times their mean (for a decoder layer made of several linears
the scores of all of them are pooled). Layer sparsity S_l = alpha * (1 - D_l) with alpha chosen
so that the parameter-weighted mean of S_l is the target S (seed 003: S_l' = S (1 - D_l')
sum_l m_l n_l / sum_l m_l n_l (1 - D_l)): layers with more outliers are pruned less.

The seed gives no lambda; the OWL paper bounds S_l to [S - lambda, S + lambda]. Our choice
(mode="proportional", default): S_l = clip(alpha (1 - D_l), S - lambda, S + lambda) with alpha
found by bisection so the (weighted) mean is still exactly S; unclipped layers keep the seed's
proportional law. mode="minmax" follows the OWL reference code instead: D is min-max normalised
to [0, 1] and mapped linearly onto a span of 2*lambda (S_l = c + lambda (1 - 2 z_l)), the
offset c found the same way, with the same clip. Both are monotone: more outliers -> lower S_l.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..errors import RecipeError
from .masks import check_sparsity

MAX_SPARSITY = 1.0 - 1e-6  # allocations stay in [0, 1)


def outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """Fraction of the entries of a Wanda score matrix greater than m times its mean."""
    return outlier_ratio_of([scores], m)


CHUNK = 1 << 20  # score elements compared at a time (their fp64 copies: 8 MiB)


def outlier_ratio_of(scores: Sequence, m: float = 5.0) -> float:
    """outlier_ratio of several score tensors pooled (one decoder layer = all its linears). Each item
    is a tensor, or a function making one (called twice: the mean, then the count above m times it),
    so that one linear's scores are in memory at a time, not the layer's."""
    if not isinstance(m, (int, float)) or not m > 0:
        raise RecipeError(f"OWL outlier threshold m must be > 0 (the paper uses 3..10), got {m!r}")
    makers = [s if callable(s) else (lambda s=s: s) for s in scores]
    total, count = 0.0, 0
    for make in makers:  # E[A] over the pooled scores, summed in fp64
        a = make().detach().reshape(-1)
        if a.numel() and not bool(torch.isfinite(a).all()):
            raise RecipeError("outlier_ratio: scores must be finite")
        total += float(a.sum(dtype=torch.float64))
        count += a.numel()
    if count == 0:
        raise RecipeError("outlier_ratio needs at least one non-empty score tensor")
    threshold = m * (total / count)
    above = 0
    for make in makers:  # A > M·E[A], compared in fp64 a chunk at a time
        above += sum(int((c.double() > threshold).sum()) for c in make().detach().reshape(-1).split(CHUNK))
    return above / count


def _bisect(f, lo: float, hi: float, target: float, iters: int = 200) -> float:
    """x in [lo, hi] with f(x) = target for a continuous non-decreasing f, f(lo) <= target <= f(hi)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def owl_sparsities(ratios: Mapping[str, float], target: float, lam: float = 0.08,
                   sizes: Mapping[str, int] | None = None, mode: str = "proportional") -> dict[str, float]:
    """Per-layer sparsities from outlier ratios D_l (see module doc).

    Their mean (weighted by `sizes`, e.g. parameter counts, when given) equals `target`, and each
    lies in [max(target - lam, 0), min(target + lam, 1)) and decreases as D_l increases.
    """
    check_sparsity(target)
    if not isinstance(lam, (int, float)) or not lam >= 0 or not math.isfinite(lam):
        raise RecipeError(f"OWL lambda must be a finite number >= 0, got {lam!r}")
    if mode not in ("proportional", "minmax"):
        raise RecipeError(f"OWL mode must be 'proportional' or 'minmax', got {mode!r}")
    if not ratios:
        raise RecipeError("owl_sparsities needs at least one layer ratio")
    names = list(ratios)
    d = torch.tensor([float(ratios[k]) for k in names], dtype=torch.float64)
    if not torch.isfinite(d).all() or (d < 0).any() or (d > 1).any():
        raise RecipeError(f"OWL outlier ratios must be fractions in [0, 1], got {dict(ratios)}")
    if sizes is None:
        w = torch.ones_like(d)
    else:
        missing = [k for k in names if k not in sizes]
        if missing:
            raise RecipeError(f"owl_sparsities: sizes lacks layers {missing}")
        w = torch.tensor([float(sizes[k]) for k in names], dtype=torch.float64)
        if not (w > 0).all():
            raise RecipeError("owl_sparsities: sizes must be positive parameter counts")
    w = w / w.sum()
    lo, hi = max(target - lam, 0.0), max(min(target + lam, MAX_SPARSITY), target)
    if target == 0 or hi == lo or bool((d == d[0]).all()):
        return {k: float(target) for k in names}

    def mean(s: torch.Tensor) -> float:
        return float((w * s).sum())

    if mode == "proportional":
        x = 1.0 - d
        def alloc(alpha: float) -> torch.Tensor:
            return (alpha * x).clamp(lo, hi)
        top = hi / float(x[x > 0].min()) if (x > 0).any() else 1.0
        s = alloc(_bisect(lambda a: mean(alloc(a)), 0.0, top, target))
    else:
        z = (d - d.min()) / (d.max() - d.min())
        def alloc(c: float) -> torch.Tensor:
            return (c + lam * (1.0 - 2.0 * z)).clamp(lo, hi)
        s = alloc(_bisect(lambda c: mean(alloc(c)), lo - lam, hi + lam, target))
    # the bisection leaves a ~1e-16 gap: spread it over the layers strictly inside the bounds
    free = (s > lo) & (s < hi)
    if free.any():
        s = torch.where(free, s + (target - mean(s)) / float(w[free].sum()), s)
    s = s.clamp(lo, hi)
    return {k: float(v) for k, v in zip(names, s)}

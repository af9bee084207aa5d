"""Mask selection shared by the pruning metrics: unstructured (per layer or per row) and N:M.

Every function takes a score tensor shaped like the weight ([out, in]; higher = more
important) and returns a bool keep-mask of the same shape.
"""
from __future__ import annotations

import torch

from ..errors import RecipeError


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"N:M" -> (N, M): keep N in every M consecutive inputs. None means unstructured."""
    if pattern is None:
        return None
    try:
        n_str, m_str = str(pattern).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise RecipeError(f"pattern must be None or 'N:M' such as '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise RecipeError(f"pattern {pattern!r} needs 0 < N < M (e.g. '2:4' keeps 2 of every 4)")
    return n, m


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise RecipeError(f"sparsity must be in [0, 1), got {sparsity!r} (0.5 prunes half the weights)")


def check_nm_width(pattern: tuple[int, int], in_features: int, where: str = "weight") -> None:
    n, m = pattern
    if in_features % m:
        raise RecipeError(f"{n}:{m} pattern needs the input width to be a multiple of {m}, but {where} "
                          f"has {in_features} inputs; pick M dividing {in_features} or skip this module")


def follows_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """Whether w [out, in] has at most n nonzeros in every group of m consecutive inputs of a row."""
    return w.shape[1] % m == 0 and (not w.numel() or int((w.reshape(w.shape[0], -1, m) != 0).sum(-1).max()) <= n)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune the floor(sparsity * n) lowest scores of the layer (or of each row when per_row)."""
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)  # contiguous, even for a transposed view
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            keep.scatter_(1, idx, False)
    else:
        k = int(scores.numel() * sparsity)
        if k:
            idx = torch.topk(scores.flatten(), k, largest=False).indices
            keep.view(-1)[idx] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive columns of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(rows, cols)

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


def zero_share(t: torch.Tensor) -> float:
    """The share of exact zeros in `t` (counted: a bool copy of t, no float one)."""
    return int((t == 0).sum()) / max(t.numel(), 1)


def follows_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """Whether w [out, in] has at most n nonzeros in every group of m consecutive inputs of a row."""
    return w.shape[1] % m == 0 and (not w.numel() or int((w.reshape(w.shape[0], -1, m) != 0).sum(-1).max()) <= n)


CHUNK = 1 << 18  # scores ranked at a time (the per-row topk, lowest_k's passes)
LARGE = 1 << 20  # a layer-wise selection over more scores than this uses lowest_k (a topk holds ~26 bytes a score)


def row_chunks(rows: int, cols: int):
    """Slices of consecutive rows of an [rows, cols] matrix holding about CHUNK elements (one row at least)."""
    step = max(1, CHUNK // max(cols, 1))
    return (slice(i, i + step) for i in range(0, rows, step))


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune the floor(sparsity * n) lowest scores of the layer (or of each row when per_row).
    Rows are ranked CHUNK scores at a time and a large layer of non-negative fp32 scores by
    `lowest_k`, so the selection holds the mask and a few MiB beside the scores."""
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)  # contiguous, even for a transposed view
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            for rows in row_chunks(*scores.shape):
                keep[rows].scatter_(1, torch.topk(scores[rows], k, dim=1, largest=False).indices, False)
        return keep
    k = int(scores.numel() * sparsity)
    if k and scores.dim() == 2 and scores.numel() > LARGE and scores.dtype == torch.float32 and \
            bool(scores.amin() >= 0):
        lowest_k(scores, k, keep)
    elif k:
        keep.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return keep


def lowest_k(scores: torch.Tensor, k: int, keep: torch.Tensor) -> None:
    """Clear `keep` (bool, [rows, cols]) at the k lowest of the non-negative fp32 `scores` [rows, cols]
    (any strides), CHUNK at a time. A radix select on the values' bits (for x >= 0, IEEE-754 bits
    without the sign order as x does) finds the k-th lowest value t, 8 bits a pass (4 passes, each a
    256-bin histogram of the keys that share the digits found so far). Every score < t is pruned, and
    of the E scores equal to t the `ties` still needed, spread evenly in row-major order (the i-th
    equal one, from 0, when floor((i+1)·ties/E) > floor(i·ties/E)): bf16 weights tie by the
    thousands at the threshold, and taking the first ones would prune the top rows more."""
    def keys(rows):
        return scores[rows].contiguous().view(torch.int32) & 0x7FFFFFFF  # -0.0 as +0.0

    chunks = list(row_chunks(*scores.shape))
    prefix, rank = 0, k  # the key's digits found so far; t's rank among the keys sharing them (from 1)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.int64, device=scores.device)
        for rows in chunks:
            key = keys(rows)
            if shift < 24:
                key = key[(key >> (shift + 8)) == (prefix >> (shift + 8))]
            hist += torch.bincount(((key >> shift) & 255).flatten(), minlength=256)
        below = torch.cumsum(hist, 0)
        digit = int((below < rank).sum())  # the first bin whose count reaches the rank
        rank -= int(below[digit - 1]) if digit else 0
        prefix |= digit << shift
    ties, equal_total, seen = rank, int(hist[digit]), 0  # the last histogram counts the keys equal to t
    for rows in chunks:
        key = keys(rows)
        drop = key < prefix
        where = (key == prefix).flatten().nonzero().flatten()  # the chunk's equal keys, in row-major order
        i = torch.arange(seen, seen + len(where), device=key.device)  # their ordinals among all E
        drop.view(-1)[where[(i + 1) * ties // equal_total > i * ties // equal_total]] = True
        keep[rows] &= ~drop
        seen += len(where)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive columns of each row (CHUNK scores at a time)."""
    rows, cols = scores.shape
    keep = torch.zeros((rows, cols // m, m), dtype=torch.bool, device=scores.device)
    for r in row_chunks(rows, cols):
        part = scores[r].reshape(len(range(rows)[r]), cols // m, m)
        keep[r].scatter_(2, torch.topk(part, n, dim=2).indices, True)
    return keep.reshape(rows, cols)

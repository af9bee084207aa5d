"""Exact Optimal Brain Surgeon, row by row (OBC, Frantar et al. 2022): seed 000, "Algorithm 1 Prune
k <= d_col weights from row w with inverse Hessian H^-1 = (2XX^T)^-1 according to OBS in
O(k * d_col^2) time":

    repeat k times:  p  <- argmin_{p in M} w_p^2 / [H^-1]_pp
                     w  <- w - H^-1_{:,p} w_p / [H^-1]_pp                 (seed 003 Eq. 3)
                     H^-1 <- H^-1 - H^-1_{:,p} H^-1_{p,:} / [H^-1]_pp    (drop p: Schur complement)
                     M  <- M - {p}

Each row has its own copy of H^-1 (the rows' pruned sets differ); rows are processed in chunks
as a batch ([chunk, in, in] in memory). Unstructured: every row prunes floor(sparsity * in).
N:M: p is restricted to groups that have not yet pruned their M - N, so each keeps exactly N.
The Hessian is conditioned as SparseGPT does (dead inputs zeroed, lambda = damp * mean diag H).
"""
from __future__ import annotations

import math

import torch

from ..errors import RecipeError
from .masks import check_nm_width, check_sparsity, parse_pattern
from .sparsegpt import check_hessian, inverse_hessian, single_thread

DEFAULT_MAX_COST = 2e12        # multiply-adds; 1024x1024 at 90% is ~1e12, 4096x4096 at 50% is ~1.4e14
CHUNK_BYTES = 256 * 2 ** 20    # memory for one chunk of per-row inverse Hessians
NOMINAL_MACS_PER_S = 5e9       # rank-1 downdates on one CPU core (measured: 5.1e9/s at 4096, 5.5e9/s at 512)


def obs_cost(rows: int, cols: int, pruned_per_row: int) -> float:
    """Multiply-adds of the row-wise OBS: one rank-1 downdate of an [in, in] matrix per removal."""
    return float(rows) * pruned_per_row * cols * cols


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def obs(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5, pattern: str | None = None,
        damp: float = 0.01, max_cost: float = DEFAULT_MAX_COST, name: str = "weight",
        chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [out, in] by exact per-row OBS given its Hessian [in, in].

    Returns (new_weight, keep_mask) like `sparsegpt`. Refuses (RecipeError) when the estimated
    cost rows * k * in^2 exceeds `max_cost` multiply-adds; SparseGPT is the scalable version.
    """
    check_hessian(weight, hessian, "OBS")
    nm = parse_pattern(pattern)
    rows, cols = weight.shape
    if nm is not None:
        check_nm_width(nm, cols, name)
        k = cols // nm[1] * (nm[1] - nm[0])
    else:
        check_sparsity(sparsity)
        k = int(cols * sparsity)
    if not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise RecipeError(f"OBS damp must be a finite number >= 0, got {damp!r}")
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    if k == 0:
        return weight.detach().clone(), keep
    cost = obs_cost(rows, cols, k)
    if cost > max_cost:
        raise RecipeError(
            f"OBS on {name!r} ({rows}x{cols}, {k} weights pruned per row) needs ~{cost:.2g} multiply-adds "
            f"(~{_duration(cost / NOMINAL_MACS_PER_S)} at {NOMINAL_MACS_PER_S:.0e}/s on a CPU core), over max_cost="
            f"{max_cost:.2g}; use SparseGPT (its approximation of this OBS solution, O(in^3)) or raise max_cost")

    cdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(cdtype).clone()
    hinv, dead, _ = inverse_hessian(hessian.detach().to(weight.device, cdtype), float(damp), name,
                                    upper_factor=False, method="OBS")
    W[:, dead] = 0
    chunk = max(1, int(chunk_bytes // (cols * cols * W.element_size())))
    with single_thread():  # k sequential steps; measured several times faster on a busy 2-core CPU
        for r0 in range(0, rows, chunk):
            r1 = min(r0 + chunk, rows)
            W[r0:r1], keep[r0:r1] = _obs_rows(W[r0:r1], hinv, k, nm)
    W[~keep] = 0
    return W.to(weight.dtype), keep


def _obs_rows(w: torch.Tensor, hinv: torch.Tensor, k: int,
              nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 on a batch of rows w [r, in], each with its own copy of H^-1."""
    r, cols = w.shape
    w = w.clone()
    Hi = hinv.expand(r, cols, cols).clone()
    pruned = torch.zeros(r, cols, dtype=torch.bool, device=w.device)
    ar = torch.arange(r, device=w.device)
    if nm is not None:
        n, m = nm
        quota = torch.zeros(r, cols // m, dtype=torch.long, device=w.device)  # pruned so far per group
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    tiny = torch.finfo(w.dtype).tiny
    for _ in range(k):
        diag = Hi.diagonal(dim1=1, dim2=2)
        score = torch.where(pruned, inf, w * w / diag.clamp_min(tiny))
        if nm is not None:  # groups that already pruned M - N are closed
            full = (quota >= m - n).repeat_interleave(m, dim=1)
            score = torch.where(full, inf, score)
        p = score.argmin(dim=1)
        col = Hi[ar, :, p]                       # H^-1_{:,p} per row  [r, in]
        dpp = diag[ar, p].clamp_min(tiny)        # [H^-1]_pp
        w -= (w[ar, p] / dpp)[:, None] * col     # OBS update of the remaining weights
        Hi.baddbmm_(col[:, :, None], (col / dpp[:, None])[:, None, :], alpha=-1)  # remove p from H^-1
        pruned[ar, p] = True
        w[ar, p] = 0
        if nm is not None:
            quota[ar, p // m] += 1
    return w, ~pruned

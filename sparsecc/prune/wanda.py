"""Wanda: prune by weights and activations (Sun et al. 2023; seed 002, "Pruning Metric" and its
"Algorithm 1 PyTorch code for Wanda").

Score S_ij = |W_ij| * ||X_j||_2, compared within each output row (Wanda's "per output" comparison
group) or, for an N:M pattern, within every M consecutive inputs of a row. No weight update.
Seed 003 §3 derives it as OBS with a diagonal Hessian: w_j^2 * H_jj = (|w_j| ||X_j||)^2.
"""
from __future__ import annotations

import torch

from ..errors import RecipeError
from .masks import check_nm_width, check_sparsity, nm_mask, parse_pattern, unstructured_mask


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 broadcast over rows, in fp32 (fp64 for an fp64 weight); shapes checked."""
    if weight.dim() != 2:
        raise RecipeError(f"Wanda expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    act_norm = torch.as_tensor(act_norm)
    if act_norm.dim() != 1 or act_norm.shape[0] != weight.shape[1]:
        raise RecipeError(f"Wanda needs act_norm of shape [in] = [{weight.shape[1]}] (the L2 norm of each input "
                          f"column over the calibration tokens), got shape {tuple(act_norm.shape)}")
    if not torch.isfinite(act_norm).all() or (act_norm < 0).any():
        raise RecipeError("act_norm must be finite and non-negative (it is ||X_j||_2 per input column)")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scores = weight.detach().to(dtype, copy=True).abs_()  # one [out, in] copy, made and scored in place
    return scores.mul_(act_norm.detach().to(weight.device, dtype))


def wanda(weight: torch.Tensor, act_norm: torch.Tensor, sparsity: float = 0.5,
          pattern: str | None = None) -> torch.Tensor:
    """Keep-mask (bool, [out, in]) for `weight` [out, in] given act_norm[j] = ||X_j||_2 ([in]).

    Unstructured: each row keeps all but its floor(sparsity * in) lowest scores. With
    `pattern="N:M"` every M consecutive inputs of a row keep their N highest scores and
    `sparsity` is ignored (it is 1 - N/M).
    """
    scores = wanda_scores(weight, act_norm)
    nm = parse_pattern(pattern)
    if nm is not None:
        check_nm_width(nm, weight.shape[1])
        return nm_mask(scores, *nm)
    check_sparsity(sparsity)
    return unstructured_mask(scores, sparsity, per_row=True)

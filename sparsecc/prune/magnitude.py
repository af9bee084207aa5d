"""Magnitude pruning: keep the weights with the largest |W_ij| (the papers' baseline)."""
from __future__ import annotations

import torch

from ..errors import RecipeError
from .masks import check_nm_width, check_sparsity, nm_mask, parse_pattern, unstructured_mask


def magnitude(weight: torch.Tensor, sparsity: float = 0.5, pattern: str | None = None,
              group: str = "layer") -> torch.Tensor:
    """Keep-mask for `weight` ([out, in]) by |W|.

    `group="layer"` compares all entries of the matrix (the SparseGPT/Wanda baseline);
    `group="output"` compares within each output row. With `pattern="N:M"` the comparison
    group is every M consecutive inputs of a row and `sparsity` is ignored (it is 1 - N/M).
    """
    if weight.dim() != 2:
        raise RecipeError(f"magnitude pruning expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if group not in ("layer", "output"):
        raise RecipeError(f"group must be 'layer' or 'output', got {group!r}")
    scores = weight.detach().to(torch.float32, copy=True).abs_()  # one fp32 copy, whatever the dtype
    nm = parse_pattern(pattern)
    if nm is not None:
        check_nm_width(nm, weight.shape[1])
        return nm_mask(scores, *nm)
    check_sparsity(sparsity)
    return unstructured_mask(scores, sparsity, per_row=(group == "output"))

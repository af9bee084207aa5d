"""Layer-wise reconstruction error, the objective SparseGPT/OBS minimise (seed 002 "Layer-wise
reconstruction": argmin ||WX - W^X||_2^2; seed 003 §1.1: ||(w - w')^T X||^2 = <H(w - w'), w - w'>).

With X as [tokens, in] and the raw Gram matrix H = X^T X ([in, in]):
    ||X W^T - X W^^T||_F^2 = trace((W - W^) H (W - W^)^T) = sum_ij [(W - W^) H]_ij (W - W^)_ij.
"""
from __future__ import annotations

import torch

from ..errors import RecipeError
from .masks import row_chunks


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian_xtx: torch.Tensor) -> float:
    """||W X - W^ X||^2 over the calibration tokens, from H = X^T X (computed in fp64)."""
    if weight.shape != new_weight.shape or weight.dim() != 2:
        raise RecipeError(f"weight and new_weight must be 2-D of one shape, got {tuple(weight.shape)} "
                          f"and {tuple(new_weight.shape)}")
    cols = weight.shape[1]
    if tuple(hessian_xtx.shape) != (cols, cols):
        raise RecipeError(f"hessian_xtx must be [in, in] = [{cols}, {cols}], got {tuple(hessian_xtx.shape)}")
    # bands of H's columns and of W's rows: fp64 temporaries of a few MiB, not [in, in] and 4 x [out, in]
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    rows, band = max(1, 2 ** 18 // cols), max(1, 2 ** 21 // cols)
    for j in range(0, cols, band):
        h = hessian_xtx[:, j:j + band].detach().to(weight.device, torch.float64)
        for i in range(0, weight.shape[0], rows):
            delta = weight[i:i + rows].detach().double() - new_weight[i:i + rows].detach().double().to(weight.device)
            total += ((delta @ h) * delta[:, j:j + band]).sum()
    return float(total)


def relative_error(weight: torch.Tensor, new_weight: torch.Tensor, xtx: torch.Tensor | None = None,
                   sumsq: torch.Tensor | None = None) -> tuple[float | None, str | None]:
    """||(W - W^)X||^2 / ||WX||^2 on the calibration inputs, for the per-layer report.

    Exact from X^T X when the layer's Hessian was collected ("hessian"); otherwise estimated from
    the per-column sums of squares diag(X^T X) alone, ignoring input correlations ("diagonal");
    (None, None) when neither statistic exists (data-free pruning)."""
    if xtx is not None:
        base = reconstruction_error(weight, torch.zeros((), dtype=weight.dtype).expand_as(weight), xtx)
        return (reconstruction_error(weight, new_weight, xtx) / base if base > 0 else 0.0), "hessian"
    if sumsq is not None:
        s = sumsq.detach().double().to(weight.device)
        base = err = torch.zeros((), dtype=torch.float64, device=weight.device)
        for rows in row_chunks(*weight.shape):  # fp64 bands of a few MiB, not 4 x [out, in]
            w = weight[rows].detach().double()
            d = w - new_weight[rows].detach().double().to(weight.device)
            base, err = base + (w * w * s).sum(), err + (d * d * s).sum()
        return (float(err) / float(base) if base > 0 else 0.0), "diagonal"
    return None, None

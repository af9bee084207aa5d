"""SparseGPT (Frantar & Alistarh 2023): seed 000, "Algorithm 1 The SparseGPT algorithm".

    H^-1 <- Cholesky(H^-1)^T                 (upper factor U of the damped inverse Hessian)
    for each block of B columns, for each column j in it:
        if j mod B_s = 0: mask the p% of W[:, j:j+B_s] with smallest w^2 / U_cc^2
        E[:, j-i] <- (1 - M[:, j]) * W[:, j] / U_jj                (pruning error, kept ones frozen)
        W[:, j:i+B] -= E[:, j-i] U[j, j:i+B]                      (OBS update inside the block)
    after each block: W[:, i+B:] -= E U[i:i+B, i+B:]               (lazy batch update)

Seed 003 §2 proves why this is the OBS update (Lemma 1) with the Cholesky simplification
(H_/S^-1)_{:,j} ~ L_jj L_jR. The Hessian is conditioned as in the reference code: dead inputs
(H_jj = 0) get H_jj = 1 and their weights are zeroed, then lambda*I with lambda = damp*mean(diag H)
is added (`dampen`).

Quantization (seed 001 "Joint Sparsification and Quantization"; seed 000's OBS for quantization,
e_i^T dW + (W_i - Q(W_i)) = 0): with `bits`, each kept weight of column j is rounded to its group's
grid (prune/quantize.py) in the same sweep and its error (W_j - Q(W_j)) / U_jj is fed forward
like a pruning error: E[:, j-i] <- (W[:, j] - M[:, j] * Q(W[:, j])) / U_jj. A group's scale and
zero point are taken when the sweep reaches its first column, from its kept weights as updated
so far (GPTQ's grid, mask-aware). sparsity = 0 with `bits` is GPTQ.

Mask-count rule (unstructured): each mask block of B_s consecutive columns (the last one may be
narrower, width b) prunes exactly floor(sparsity * rows * b) entries, chosen over all rows of the
block. N:M: at every column j with j mod M = 0, each row keeps the N largest w^2/U_cc^2 of
columns j..j+M (scores taken on the weights as updated so far, like the B_s masks).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch

from ..errors import CalibrationError, RecipeError
from .masks import check_nm_width, check_sparsity, nm_mask, parse_pattern, unstructured_mask
from .quantize import QuantGrid, check_quant, grid_params, make_grid, quantize_codes

MAX_DAMP = 1.0  # the largest relative damping tried before giving up on Cholesky


class HessianWarning(UserWarning):
    """The Hessian of a layer needed more damping than asked for, or could not be inverted."""


def dampen(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's conditioning of H before its inverse: dead inputs (H_jj = 0, never active)
    get H_jj = 1 (their weights should be zeroed by the caller), then lambda*I is added with
    lambda = damp * mean(diag H). Returns (damped H, bool mask of dead columns)."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.diagonal(h).mean()
    return h, dead


@contextlib.contextmanager
def single_thread():
    """Run a loop of many small ops on one intra-op thread (restored afterwards): for them threads
    only add synchronisation, and on a busy machine each parallel op can stall for milliseconds
    (measured here under load: SparseGPT 512x512 took 5.4 s on 2 threads, 0.06 s on 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_hessian(weight: torch.Tensor, hessian: torch.Tensor, method: str) -> None:
    """Shape/finiteness checks shared by SparseGPT and OBS."""
    if weight.dim() != 2:
        raise RecipeError(f"{method} expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise RecipeError(f"{method} needs a floating-point weight, got {weight.dtype}")
    cols = weight.shape[1]
    if hessian.dim() != 2 or tuple(hessian.shape) != (cols, cols):
        raise RecipeError(f"{method} needs a Hessian of shape [in, in] = [{cols}, {cols}] (X^T X over the "
                          f"layer's inputs), got shape {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise CalibrationError(f"{method}: the Hessian has NaN/Inf entries; the calibration activations "
                               "overflowed or were not finite")


def _damp_schedule(damp: float) -> list[float]:
    """damp, then x10 steps (from 1e-4 when damp = 0) up to MAX_DAMP."""
    tries = [float(damp)]
    d = damp if damp > 0 else 1e-4
    while d * 10 <= MAX_DAMP * (1 + 1e-9):
        d *= 10
        tries.append(d)
    if tries[-1] < MAX_DAMP:
        tries.append(MAX_DAMP)
    return tries


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def inverse_hessian(hessian: torch.Tensor, damp: float, name: str, upper_factor: bool,
                    method: str = "SparseGPT") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(H + lambda I)^-1, or its upper Cholesky factor U (H^-1 = U^T U) when `upper_factor`.

    Tries `damp` then larger dampings (warning when more than `damp` was needed); if every
    Cholesky fails it falls back to the diagonal inverse 1/|H_jj| (Wanda-like scores, no
    weight updates since the off-diagonal terms are zero) and warns. Returns
    (matrix, dead-input mask, exact) where exact is False for the diagonal fallback.
    """
    tries = _damp_schedule(damp)
    for k, d in enumerate(tries):
        h, dead = dampen(hessian, d)
        chol, info = torch.linalg.cholesky_ex(h)
        del h  # each step frees its input: two [in, in] matrices live at a time, not four
        if info.item() != 0 or not _finite(chol):
            continue
        out = torch.cholesky_inverse(chol)
        del chol
        if upper_factor:
            out, info = torch.linalg.cholesky_ex(out, upper=True)
            if info.item() != 0:
                continue
        if not _finite(out):
            continue
        if k:
            warnings.warn(f"{method}: Cholesky of the Hessian of {name!r} failed with damp={tries[0]:g}; "
                          f"used damp={d:g} (tried {[f'{t:g}' for t in tries[:k + 1]]})", HessianWarning,
                          stacklevel=3)
        return out, dead, True
    warnings.warn(f"{method}: Cholesky of the Hessian of {name!r} failed for every damping tried "
                  f"({[f'{t:g}' for t in tries]}); falling back to a diagonal inverse Hessian 1/|H_jj| "
                  "(Wanda-like scores, no weight updates)", HessianWarning, stacklevel=3)
    dead = hessian.diagonal() == 0
    diag = hessian.diagonal().abs().clone()
    diag[(diag == 0) | ~torch.isfinite(diag)] = 1.0
    inv = 1.0 / diag
    return torch.diag(inv.sqrt() if upper_factor else inv), dead, False


def _check_blocks(blocksize: int, mask_blocksize: int | None, nm: tuple[int, int] | None) -> tuple[int, int]:
    for label, b in (("blocksize", blocksize), ("mask_blocksize", mask_blocksize)):
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise RecipeError(f"SparseGPT {label} must be a positive int, got {b!r}")
    bs = blocksize if mask_blocksize is None else mask_blocksize
    if nm is not None:
        # an N:M group must not straddle a lazy block (its later columns would lack this block's
        # updates when the group is scored): round B to a multiple of M
        m = nm[1]
        return max(m, blocksize // m * m), bs
    if bs % blocksize and blocksize % bs:
        # a mask block must start on fully updated columns: B_s divides B (inside one block) or
        # B divides B_s (starts at a block boundary, after the lazy update)
        raise RecipeError(f"SparseGPT mask_blocksize ({bs}) must divide blocksize ({blocksize}) or be a "
                          "multiple of it")
    return blocksize, bs


@dataclass
class _Quant:
    """The quantization state of one sweep: bits, group width, and per group (scale, zero) and codes."""

    bits: int
    group: int
    sym: bool
    scales: torch.Tensor
    zeros: torch.Tensor
    codes: torch.Tensor


def _pruned_ahead(W1: torch.Tensor, U1: torch.Tensor, d: torch.Tensor, keep: torch.Tensor, j0: int,
                  nm: tuple[int, int] | None) -> torch.Tensor:
    """A quantization group's weights after the pruning-only sweep of its columns (their OBS updates
    applied, no rounding), so its grid covers where the kept weights move rather than where they
    start (fewer clamped codes). N:M masks of the group are chosen here as the sweep will choose them."""
    W1 = W1.clone()
    zero = torch.zeros((), dtype=W1.dtype, device=W1.device)
    for c in range(W1.shape[1]):
        if nm is not None and (j0 + c) % nm[1] == 0:
            keep[:, c:c + nm[1]] = nm_mask(W1[:, c:c + nm[1]] ** 2 / d[c:c + nm[1]] ** 2, *nm)
        err = torch.where(keep[:, c], zero, W1[:, c] / U1[c, c])
        W1[:, c:] -= err[:, None] * U1[c, c:][None, :]
    return W1


def _sweep_block(W: torch.Tensor, U: torch.Tensor, d: torch.Tensor, keep: torch.Tensor, i1: int, i2: int,
                 sparsity: float, nm: tuple[int, int] | None, Bs: int, quant: _Quant | None = None) -> torch.Tensor:
    """Columns i1..i2 of Algorithm 1: masks, pruning (and quantization) errors, in-block OBS updates.
    Writes W[:, i1:i2] and keep in place; returns the block's errors E for the lazy update of the
    later columns."""
    cols = W.shape[1]
    W1 = W[:, i1:i2].clone()
    E = torch.zeros_like(W1)
    U1 = U[i1:i2, i1:i2]
    zero = torch.zeros((), dtype=W.dtype, device=W.device)
    for j in range(i1, i2):
        c = j - i1
        if nm is not None:
            if j % nm[1] == 0:  # a new group of M (B is a multiple of M: it lies inside this block)
                sc = W1[:, c:c + nm[1]] ** 2 / d[j:j + nm[1]] ** 2
                keep[:, j:j + nm[1]] = nm_mask(sc, *nm)
        elif j % Bs == 0:
            jb = min(j + Bs, cols)
            # columns beyond this block are up to date here: B divides B_s, so j = i1 and the
            # previous blocks' lazy updates have been applied
            blk = W1[:, c:c + (jb - j)] if jb <= i2 else W[:, j:jb]
            keep[:, j:jb] = unstructured_mask(blk ** 2 / d[j:jb] ** 2, sparsity, per_row=False)
        w = W1[:, c]
        if quant is None:
            target = torch.where(keep[:, j], w, zero)  # pruned -> 0, kept frozen
        else:
            g = j // quant.group
            if j % quant.group == 0:  # a new group: its grid from its kept weights
                jg = j + quant.group
                if jg <= i2:  # as they will be once this group's pruning errors are fed forward
                    grp = _pruned_ahead(W1[:, c:jg - i1], U1[c:jg - i1, c:jg - i1], d[j:jg], keep[:, j:jg], j, nm)
                else:  # a group wider than the block: as updated so far
                    grp = torch.cat((W1[:, c:], W[:, i2:jg]), dim=1)
                grp = torch.where(keep[:, j:jg], grp, zero)
                quant.scales[:, g], quant.zeros[:, g] = grid_params(grp, quant.bits, quant.sym)
            scale, zp = quant.scales[:, g], quant.zeros[:, g]
            code = torch.where(keep[:, j], quantize_codes(w, scale, zp, quant.bits), zp)
            quant.codes[:, j] = code
            target = scale * (code - zp)  # Q(w) where kept, exactly 0 where pruned (code = zero point)
        err = (w - target) / U1[c, c]  # pruning (and quantization) error of column j
        W1[:, c:] -= err[:, None] * U1[c, c:][None, :]
        W1[:, c] = target  # exact (the update gives it up to rounding)
        E[:, c] = err
    W[:, i1:i2] = W1
    return E


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5, pattern: str | None = None,
              blocksize: int = 128, damp: float = 0.01, mask_blocksize: int | None = None,
              name: str = "weight", bits: int | None = None, group_size: int | None = 128, sym: bool = False):
    """Prune `weight` [out, in] with SparseGPT given its Hessian [in, in] (X^T X; any positive scale).

    Returns (new_weight, keep_mask): new_weight has the weight's dtype/device and is exactly zero
    wherever keep_mask (bool, [out, in]) is False. `sparsity` is ignored for an "N:M" pattern.
    `name` (the layer) only appears in warnings.

    With `bits` (2, 3, 4 or 8) the kept weights are also quantized in the same sweep, per group of
    `group_size` inputs (None: one group per row), asymmetric unless `sym`; returns (new_weight,
    keep_mask, grid) where new_weight = grid.dequantize() (prune/quantize.QuantGrid). sparsity=0
    with bits is GPTQ (`gptq`).
    """
    check_hessian(weight, hessian, "SparseGPT")
    nm = parse_pattern(pattern)
    rows, cols = weight.shape
    if nm is not None:
        check_nm_width(nm, cols, name)
    else:
        check_sparsity(sparsity)
    if not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise RecipeError(f"SparseGPT damp must be a finite number >= 0, got {damp!r}")
    B, Bs = _check_blocks(blocksize, mask_blocksize, nm)
    quant = None
    if bits is not None:
        g = check_quant(bits, group_size, cols, name)
        quant = _Quant(bits, g, sym, *(torch.zeros(rows, cols // g, dtype=torch.float32 if weight.dtype != torch.float64
                                                    else torch.float64, device=weight.device) for _ in range(2)),
                       torch.zeros(rows, cols, dtype=torch.uint8, device=weight.device))
    elif nm is None and sparsity == 0:
        return weight.detach().clone(), torch.ones(rows, cols, dtype=torch.bool, device=weight.device)

    cdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(cdtype).clone()
    U, dead, _ = inverse_hessian(hessian.detach().to(weight.device, cdtype), float(damp), name, upper_factor=True)
    W[:, dead] = 0  # inputs never active: their weights contribute nothing on the calibration data
    d = U.diagonal()
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)

    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        with single_thread():
            E = _sweep_block(W, U, d, keep, i1, i2, sparsity, nm, Bs, quant)
        if i2 < cols:
            W[:, i2:] -= E @ U[i1:i2, i2:]  # lazy batch update of all later columns

    if quant is None:
        W[~keep] = 0
        return W.to(weight.dtype), keep
    grid = make_grid(quant.codes, quant.scales, quant.zeros, bits, quant.group, sym)
    return grid.dequantize().to(weight.dtype), keep, grid


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = 128, sym: bool = False,
         blocksize: int = 128, damp: float = 0.01, name: str = "weight") -> tuple[torch.Tensor, QuantGrid]:
    """GPTQ (seed 000's OBS for quantization, in SparseGPT's sweep with no pruning) -> (weight, grid)."""
    new, _, grid = sparsegpt(weight, hessian, 0.0, None, blocksize=blocksize, damp=damp, name=name, bits=bits,
                             group_size=group_size, sym=sym)
    return new, grid

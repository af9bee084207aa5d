"""Input-channel permutation for N:M sparsity (seed 000, "Permute columns to keep more important
weights with higher magnitude / Optimize for bigger total magnitude"; Pool & Yu 2021, "Channel
Permutations for N:M Sparsity", channel-swap search).

Objective: the score kept by the N:M mask of scores[:, perm], i.e. the sum over column groups g
and rows r of the N largest scores of row r among g's M columns. Search: steepest-ascent swaps of
two columns from different groups, then a few random perturbations (seeded) re-climbed, keeping
the best. Swap gains come from one table: if column a of group g is replaced by column b,

    value(g - a + b) = sum_r topN(rest_r) + sum_r relu(s_rb - t_r),   rest = g's other M-1 columns,

with t_r the N-th largest of rest in row r (top-N of rest plus one value x is topN(rest) +
max(0, x - t_r) because N <= M - 1). A swap only changes two groups, so after it only their
2M rows of the table are recomputed.
"""
from __future__ import annotations

import torch

from ..errors import RecipeError
from .masks import check_nm_width, nm_mask

_CHUNK_ELEMS = 1 << 24  # [slots, rows, in] elements materialised at once when building the table


def _check(scores: torch.Tensor, n: int, m: int) -> None:
    if scores.dim() != 2:
        raise RecipeError(f"permutation search expects 2-D scores [out, in], got shape {tuple(scores.shape)}")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise RecipeError(f"N:M needs integers 0 < N < M, got {n}:{m}")
    check_nm_width((n, m), scores.shape[1], "scores")


def nm_retained(scores: torch.Tensor, n: int, m: int) -> float:
    """Sum of the scores kept by the N:M mask (N largest of every M consecutive columns per row)."""
    _check(scores, n, m)
    s = scores.detach().double()
    return float((s * nm_mask(s, n, m)).sum())


def apply_input_permutation(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """weight[:, perm]: column j of the result is input perm[j] (feed it x[perm])."""
    return weight[:, perm]


def apply_output_permutation(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """weight[perm]: reorder a producer's output rows (and a bias, 1-D) so its output is y[perm]."""
    return weight[perm]


class _Search:
    """Swap tables for one permutation; slot i holds column perm[i] and belongs to group i // m.

    table[a, b]: value of a's group when the column in slot a is replaced by the one in slot b.
    pair[a, b] = table[a, b] + table[b, a] - value(group a) - value(group b): the gain of swapping
    slots a and b (-inf inside a group). Both are kept up to date incrementally.
    """

    def __init__(self, s: torch.Tensor, n: int, m: int, perm: torch.Tensor):
        self.n, self.m = n, m
        self.cols, self.rows = s.shape[1], s.shape[0]
        self.groups = self.cols // m
        self.s_t = s.t().contiguous()                            # [in, rows]: column-major scores
        dev = s.device
        self.rest_idx = torch.tensor([[o for o in range(m) if o != a] for a in range(m)], device=dev)
        gid = torch.arange(self.cols, device=dev) // m
        self.same = gid[:, None] == gid[None, :]
        self.table = torch.empty(self.cols, self.cols, dtype=s.dtype, device=dev)
        self.pair = torch.empty_like(self.table)
        self.value = torch.empty(self.groups, dtype=s.dtype, device=dev)
        self.reset(perm)

    def reset(self, perm: torch.Tensor) -> None:
        self.perm = perm.clone()
        self.sp_t = self.s_t[self.perm]                          # [slot, rows]
        self._refresh(torch.arange(self.groups, device=self.perm.device), full=True)

    def _refresh(self, groups: torch.Tensor, full: bool = False) -> None:
        """Recompute values, table rows and pair rows/columns of every slot in `groups`."""
        n, m = self.n, self.m
        blk = self.sp_t.view(self.groups, m, self.rows)[groups]  # [g, m, rows]
        self.value[groups] = blk.topk(n, dim=1).values.sum((1, 2))
        rest = blk[:, self.rest_idx]                             # [g, m(slot), m-1, rows]
        top = rest.topk(n, dim=2).values                         # [g, m, n, rows], descending
        slots = (groups[:, None] * m + torch.arange(m, device=groups.device)).reshape(-1)
        base = top.sum((2, 3)).reshape(-1)                       # sum_r topN(rest_r)
        thr = top[:, :, n - 1].reshape(-1, self.rows)            # [slots, rows] t_r
        step = max(1, _CHUNK_ELEMS // max(1, self.rows * self.cols))
        for c0 in range(0, len(slots), step):
            d = (self.sp_t[None] - thr[c0:c0 + step, None, :]).clamp_min_(0).sum(2)  # [chunk, slot b]
            self.table[slots[c0:c0 + step]] = base[c0:c0 + step, None] + d
        vs = self.value.repeat_interleave(m)
        if full:
            self.pair = self.table + self.table.t() - vs[:, None] - vs[None, :]
            self.pair.masked_fill_(self.same, float("-inf"))
            return
        rows = self.table[slots] + self.table[:, slots].t() - vs[slots, None] - vs[None, :]
        rows.masked_fill_(self.same[slots], float("-inf"))
        self.pair[slots] = rows
        self.pair[:, slots] = rows.t()

    def best_swap(self) -> tuple[float, int, int]:
        flat = int(self.pair.argmax())
        return float(self.pair.view(-1)[flat]), flat // self.cols, flat % self.cols

    def swap(self, i: int, j: int) -> None:
        self.perm[[i, j]] = self.perm[[j, i]]
        self.sp_t[[i, j]] = self.sp_t[[j, i]]
        self.table[:, [i, j]] = self.table[:, [j, i]]  # table[a, b] is indexed by the slot of b
        # the table rows and pair entries of the two changed groups are recomputed
        self._refresh(torch.tensor(sorted({i // self.m, j // self.m}), device=self.perm.device))

    def total(self) -> float:
        return float(self.value.sum())


def _climb(search: _Search, budget: int, tol: float) -> int:
    steps = 0
    while steps < budget:
        g, i, j = search.best_swap()
        if not g > tol:
            break
        search.swap(i, j)
        steps += 1
    return steps


def find_permutation(scores: torch.Tensor, n: int, m: int, iters: int = 2000, restarts: int = 3,
                     seed: int = 0) -> torch.Tensor:
    """Permutation `perm` of the input columns raising nm_retained(scores[:, perm], n, m).

    Greedy best-swap hill climbing from the identity (at most `iters` swaps in all), then
    `restarts` rounds of a few random swaps followed by a new climb (generator seeded by `seed`),
    keeping the best. Never worse than the identity (checked in fp64 at the end).
    """
    _check(scores, n, m)
    rows, cols = scores.shape
    ident = torch.arange(cols, device=scores.device)
    if cols // m < 2 or rows == 0:
        return ident
    s = scores.detach().float()
    tol = 1e-6 * float(s.abs().sum()) / max(1, cols // m) + 1e-12
    search = _Search(s, n, m, ident)
    budget = int(iters)
    budget -= _climb(search, budget, tol)
    best, best_perm = search.total(), search.perm.clone()
    gen = torch.Generator().manual_seed(seed)
    kicks = max(1, cols // (4 * m))
    for _ in range(restarts):
        if budget <= 0:
            break
        perm = search.perm.clone()
        for _ in range(kicks):  # random swaps between different groups
            i, j = torch.randperm(cols, generator=gen)[:2].tolist()
            if i // m != j // m:
                perm[[i, j]] = perm[[j, i]]
        search.reset(perm)
        budget -= _climb(search, budget, tol)
        if search.total() > best + tol:
            best, best_perm = search.total(), search.perm.clone()
        else:
            search.reset(best_perm)
    if nm_retained(scores[:, best_perm], n, m) > nm_retained(scores, n, m):
        return best_perm
    return ident

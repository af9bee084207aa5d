"""Input-channel permutation for N:M sparsity (seed 000, "Permute columns to keep more important
weights with higher magnitude / Optimize for bigger total magnitude"; Pool & Yu 2021, "Channel
Permutations for N:M Sparsity", channel swaps + bounded exhaustive search + random escapes).

Objective: the score kept by the N:M mask of scores[:, perm], i.e. the sum over column groups g
and rows r of the N largest scores of row r among g's M columns. Search, all moves improving:
  1. steepest-ascent swaps of two columns from different groups;
  2. when affordable (PAIR_BUDGET), the best re-partition of the 2M columns of any two groups;
  3. `restarts` escapes: a few random swaps from the best permutation, then 1-2 again.
Layers wider than `window` columns are searched in windows of randomly dealt groups (the swap
tables are [in, in] and cost in^2 * out to build), for a few rounds.
Swap gains come from one table: if column a of group g is replaced by column b,

    value(g - a + b) = sum_r topN(rest_r) + sum_r relu(s_rb - t_r),   rest = g's other M-1 columns,

with t_r the N-th largest of rest in row r (top-N of rest plus one value x is topN(rest) +
max(0, x - t_r) because N <= M - 1). A swap only changes two groups, so after it only their
2M rows of the table are recomputed.
"""
from __future__ import annotations

import itertools
import math

import torch

from ..errors import RecipeError
from .masks import check_nm_width, nm_mask
from .sparsegpt import single_thread

_CHUNK_ELEMS = 1 << 24  # [slots, rows, in] elements materialised at once when building the table
PAIR_BUDGET = 5e7      # elements of the all-pairs re-partition table; above it only swaps are searched
KICKS_MIN = 2          # random swaps per escape, at least (cols / 4M otherwise)


def _check(scores: torch.Tensor, n: int, m: int) -> None:
    if scores.dim() != 2:
        raise RecipeError(f"permutation search expects 2-D scores [out, in], got shape {tuple(scores.shape)}")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise RecipeError(f"N:M needs integers 0 < N < M, got {n}:{m}")
    check_nm_width((n, m), scores.shape[1], "scores")
    if not torch.isfinite(scores).all():
        raise RecipeError("permutation search needs finite scores")


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


class _Pairs:
    """Best re-partition of every pair of groups: their 2M columns split into two groups of M in
    all C(2M-1, M-1) ways (Pool & Yu's exhaustive search over a bounded set of groups). A larger
    neighbourhood than single swaps; used when the full table is affordable."""

    def __init__(self, s_t: torch.Tensor, n: int, m: int):
        self.s_t, self.n, self.m = s_t, n, m
        self.groups, self.rows = s_t.shape[0] // m, s_t.shape[1]
        dev = s_t.device
        first = [(0,) + c for c in itertools.combinations(range(1, 2 * m), m - 1)]
        self.a = torch.tensor(first, device=dev)
        self.b = torch.tensor([[i for i in range(2 * m) if i not in c] for c in first], device=dev)
        g = torch.arange(self.groups, device=dev)
        self.pairs = torch.combinations(g, 2)                   # [P, 2], g1 < g2
        self.gain = torch.full((len(self.pairs),), float("-inf"), dtype=s_t.dtype, device=dev)
        self.split = torch.zeros(len(self.pairs), dtype=torch.long, device=dev)

    @staticmethod
    def cost(rows: int, cols: int, m: int) -> float:
        g = cols // m
        return g * (g - 1) / 2 * math.comb(2 * m - 1, m - 1) * rows * 2 * m

    def _values(self, sp_t: torch.Tensor, which: torch.Tensor) -> None:
        blocks = sp_t.view(self.groups, self.m, self.rows)
        value = blocks.topk(self.n, dim=1).values.sum((1, 2))
        step = max(1, (1 << 22) // (len(self.a) * 2 * self.m * self.rows))
        for c0 in range(0, len(which), step):
            pr = self.pairs[which[c0:c0 + step]]
            blk = torch.cat([blocks[pr[:, 0]], blocks[pr[:, 1]]], dim=1)  # [p, 2M, rows]
            val = blk[:, self.a].topk(self.n, dim=2).values.sum((2, 3)) + \
                blk[:, self.b].topk(self.n, dim=2).values.sum((2, 3))     # [p, splits]
            best, arg = val.max(1)
            self.gain[which[c0:c0 + step]] = best - value[pr[:, 0]] - value[pr[:, 1]]
            self.split[which[c0:c0 + step]] = arg

    def climb(self, perm: torch.Tensor, budget: int, tol: float) -> tuple[torch.Tensor, int]:
        perm = perm.clone()
        sp_t = self.s_t[perm]
        self._values(sp_t, torch.arange(len(self.pairs), device=perm.device))
        steps = 0
        while steps < budget:
            k = int(self.gain.argmax())
            if not float(self.gain[k]) > tol:
                break
            g1, g2 = self.pairs[k].tolist()
            slots = torch.cat([torch.arange(g1 * self.m, (g1 + 1) * self.m),
                               torch.arange(g2 * self.m, (g2 + 1) * self.m)]).to(perm.device)
            both = perm[slots]
            sp = int(self.split[k])
            perm[slots] = torch.cat([both[self.a[sp]], both[self.b[sp]]])
            sp_t = self.s_t[perm]
            touched = ((self.pairs == g1) | (self.pairs == g2)).any(1).nonzero().flatten()
            self._values(sp_t, touched)
            steps += 1
        return perm, steps


def _climb(search: _Search, budget: int, tol: float) -> int:
    steps = 0
    while steps < budget:
        g, i, j = search.best_swap()
        if not g > tol:
            break
        search.swap(i, j)
        steps += 1
    return steps


def find_permutation(scores: torch.Tensor, n: int, m: int, iters: int = 2000, restarts: int = 10,
                     seed: int = 0, window: int = 1024, rounds: int = 2) -> torch.Tensor:
    """Permutation `perm` of the input columns raising nm_retained(scores[:, perm], n, m).

    Hill climbing from the identity (at most `iters` improving moves in all, see the module doc),
    then `restarts` escapes (random swaps from the best so far, generator seeded by `seed`) each
    followed by a new climb, keeping the best. Never worse than the identity (checked in fp64).
    Wider than `window` columns (the swap tables are [in, in] and cost in^2 * out to build), the
    groups are dealt at random into windows of at most `window` columns, each searched on its own,
    for `rounds` rounds with fresh windows.
    """
    _check(scores, n, m)
    rows, cols = scores.shape
    ident = torch.arange(cols, device=scores.device)
    if cols // m < 2 or rows == 0:
        return ident
    if window < 2 * m:
        raise RecipeError(f"find_permutation window must hold at least two groups ({2 * m} columns), got {window}")
    with single_thread():
        if cols <= window:
            best_perm = _search(scores, n, m, iters, restarts, seed)
        else:
            best_perm = ident.clone()
            gen = torch.Generator().manual_seed(seed)
            per = window // m  # groups per window
            for r in range(rounds):
                order = torch.randperm(cols // m, generator=gen).to(scores.device)
                for w0 in range(0, len(order), per):
                    gs = order[w0:w0 + per]
                    if len(gs) < 2:
                        continue
                    slots = (gs[:, None] * m + torch.arange(m, device=scores.device)).reshape(-1)
                    cols_w = best_perm[slots]
                    local = _search(scores[:, cols_w], n, m, iters, restarts, seed + r * 7919 + w0)
                    best_perm[slots] = cols_w[local]
    if nm_retained(scores[:, best_perm], n, m) > nm_retained(scores, n, m):
        return best_perm
    return ident


def _search(scores: torch.Tensor, n: int, m: int, iters: int, restarts: int, seed: int) -> torch.Tensor:
    """Local search with escapes on one set of columns; returns the best permutation found."""
    rows, cols = scores.shape
    ident = torch.arange(cols, device=scores.device)
    s = scores.detach().float()
    tol = 1e-6 * float(s.abs().sum()) / max(1, cols // m) + 1e-12
    search = _Search(s, n, m, ident)
    pairs = _Pairs(search.s_t, n, m) if _Pairs.cost(rows, cols, m) <= PAIR_BUDGET else None
    budget = [int(iters)]

    def local_opt() -> None:
        """Swap climb, then pair re-partitions, until neither improves."""
        while budget[0] > 0:
            budget[0] -= _climb(search, budget[0], tol)
            if pairs is None or budget[0] <= 0:
                return
            perm, steps = pairs.climb(search.perm, budget[0], tol)
            if not steps:
                return
            budget[0] -= steps
            search.reset(perm)

    local_opt()
    best, best_perm = search.total(), search.perm.clone()
    gen = torch.Generator().manual_seed(seed)
    kicks = max(KICKS_MIN, cols // (4 * m))
    for _ in range(restarts):
        if budget[0] <= 0:
            break
        if not torch.equal(search.perm, best_perm):
            search.reset(best_perm)
        for _ in range(kicks):  # random swaps between different groups
            i, j = torch.randperm(cols, generator=gen)[:2].tolist()
            if i // m != j // m:
                search.swap(i, j)
        local_opt()
        if search.total() > best + tol:
            best, best_perm = search.total(), search.perm.clone()
    return best_perm

"""Per-linear H = Σ_t x_t x_tᵀ (SparseGPT's and OBS's Hessian), streamed over tokens.

Each call's partial XᵀX is computed in fp32 and added into an fp64 accumulator. The partials are
fp32 numbers (24-bit significands) and fp64 has 53: their sum is exact, so the same whatever the
order and grouping of the batches (one process, or N ranks all-reducing their sums: distributed.py),
while an entry's n partials span less than ~2^29/n in magnitude (true of the tests' models, bit for
bit; an entry whose partials cancel to tiny values could round). An fp32 accumulator rounds at every
addition, differently for each order.

Linears that read the same input (q/k/v, gate/up: `Captured.same_input`) have the same H: it is
collected once, by the first of them the pass observes, and the others' entries are that object
(a Llama block then sums and holds 4 matrices instead of 7). It is freed with the last of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import AnalysisPass


@dataclass
class HessianStats:
    """H = sum_t x_t x_t^T over the tokens seen, accumulated in fp64."""

    xtx: torch.Tensor  # [in, in] fp64 (once `compact`: H in fp32)
    count: int = 0
    scaled: bool = False  # xtx holds matrix() itself (compact)

    @classmethod
    def empty(cls, in_features: int, device=None) -> "HessianStats":
        return cls(torch.zeros(in_features, in_features, dtype=torch.float64, device=device), 0)

    def update(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:  # x: [N, in]
        """Add x^T x, computed in `dtype` (fp32: order-independent sums; fp64: closer to exact)."""
        xd = x.to(dtype)
        n, rows = xd.shape[1], max(1, 2 ** 20 // max(xd.shape[1], 1))
        for i in range(0, n, rows):  # a band of rows at a time: its fp32 and fp64 copies, not [in, in]'s
            self.xtx[i:i + rows] += (xd[:, i:i + rows].t() @ xd).to(torch.float64)
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """SparseGPT's scaling H = 2/n * X X^T (the Hessian of the layer's squared error / n), in
        fp32 (what the solvers take). Made a band of rows at a time: no full fp64 temporary (a
        4096-input layer's would be 128 MiB at the solve's peak). Once `compact`, the matrix kept."""
        if self.scaled:
            return self.xtx
        out = torch.empty(self.xtx.shape, dtype=torch.float32, device=self.xtx.device)
        scale, rows = 2.0 / max(self.count, 1), max(1, 2 ** 20 // max(self.xtx.shape[-1], 1))
        for i in range(0, out.shape[0], rows):
            out[i:i + rows] = self.xtx[i:i + rows] * scale  # the same fp64 product, rounded to fp32
        return out

    def compact(self) -> None:
        """Keep only matrix(), in place of the fp64 sums: half the bytes, and no [in, in] copy when the
        solver asks for it (for a run that drops the statistics once used). The report's relative
        error is a ratio of two quadratic forms in H, the same (up to rounding) on either."""
        if not self.scaled:
            self.xtx, self.scaled = self.matrix(), True

    def permuted(self, perm: torch.Tensor) -> "HessianStats":
        return HessianStats(self.xtx[perm][:, perm], self.count, self.scaled)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.scaled:
            raise ValueError("a compacted Hessian holds no sums to store")
        return {"xtx": self.xtx, "count": torch.tensor(self.count)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "HessianStats":
        return cls(t["xtx"].to(torch.float64), int(t["count"]))  # plans saved before hold fp32


class CollectHessians(AnalysisPass):
    name = "collect_hessians"
    produces = ("hessian",)

    def __init__(self, modules=None, dtype: torch.dtype = torch.float32):
        super().__init__(modules)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype  # of each batch's XᵀX (the sum is fp64); fp64 partials sum exactly in no order
        self.collector: dict[str, str] = {}  # observed site -> the site whose H it shares (collects it)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.collector = {}
        for name in ctx.captured.sites:  # call order: the first observed site of a group collects
            group = [s for s in ctx.captured.same_input.get(name, (name,)) if s in self.observed]
            if name in self.observed:
                self.collector[name] = group[0] if group else name

    def wants(self, site: str) -> bool:
        return super().wants(site) and self.collector.get(site, site) == site

    def observe(self, ctx, site, x):
        table = ctx.stats.setdefault("hessian", {})
        if site.name not in table:
            table[site.name] = HessianStats.empty(site.in_features, x.device)
        table[site.name].update(x, self.dtype)

    def reduce(self, ctx, names, comm):
        table = ctx.stats.setdefault("hessian", {})
        if comm.world > 1:
            counts = comm.sum_exact_(torch.tensor([table[n].count if n in table else 0 for n in names]))
            for name, count in zip(names, counts.tolist()):
                if count == 0:
                    continue  # no rank saw it (as one process would have no entry)
                site = ctx.captured.sites[name]
                h = table.get(name) or HessianStats.empty(site.in_features, site.weight(ctx.model).device)
                comm.sum_exact_(h.xtx)  # exact: sums of fp32 partials in fp64 (see the top)
                h.count, table[name] = count, h
        names = set(names)
        held = {n: table[c] for n, c in self.collector.items() if c in names and c in table}
        held |= {n: table[n] for n in names if n in table}
        for name in ctx.captured.sites:  # one order on every rank, whichever module ran first
            if name in held:
                table.pop(name, None)
                table[name] = held[name]

"""MoEfication's routers, in fp32 (Switch's selective precision): fitted by ridge least squares
on calibration statistics (`RouterStats`, collected by passes/analysis/router_stats.py), or
data-free from the experts' gate rows (`centroid_router`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

RIDGE = 1e-3       # ridge λ of the router fit, relative to the mean of diag(XᵀX)


def centroid_router(w_gate: torch.Tensor, neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free router: row e = mean of expert e's normalised W_gate rows (x · row = the mean
    normalised gate pre-activation of its neurons); zero bias."""
    w = F.normalize(w_gate.float(), dim=1)[neurons].mean(1)
    return w, torch.zeros(neurons.shape[0], device=w.device)


class RouterStats:
    """Sufficient statistics of the ridge fit s ≈ [x, 1] W (fp64): XᵀX, XᵀS, ΣS, ΣS², count; for
    the split `neurons` [E, I/E], with s_e = ‖h_e‖₂ the norm of expert e's slice of h."""

    def __init__(self, neurons: torch.Tensor, xtx, xts, s1, s2, n: int = 0):
        self.neurons, self.xtx, self.xts, self.s1, self.s2, self.n = neurons, xtx, xts, s1, s2, n

    @classmethod
    def empty(cls, hidden: int, neurons: torch.Tensor, device) -> "RouterStats":
        experts, kw = neurons.shape[0], dict(dtype=torch.float64, device=device)
        return cls(neurons, torch.zeros(hidden + 1, hidden + 1, **kw), torch.zeros(hidden + 1, experts, **kw),
                   torch.zeros(experts, **kw), torch.zeros(experts, **kw))

    def add(self, x: torch.Tensor, h: torch.Tensor) -> None:
        """x [N, hidden] the MLP inputs, h [N, I] = act(gate(x)) * up(x). Each call's sums are made
        in fp32 and added into the fp64 totals: exact in any order and grouping (as the Hessians',
        passes/analysis/hessian.py), so N ranks' summed totals are one process's, bit for bit."""
        e, m = self.neurons.shape
        s = h[:, self.neurons.reshape(-1).to(h.device)].view(-1, e, m).norm(dim=-1).float()  # s_e = ‖h_e‖₂
        x = torch.cat([x.float(), x.new_ones(x.shape[0], 1, dtype=torch.float32)], 1)
        self.xtx += (x.t() @ x).double()
        self.xts += (x.t() @ s).double()
        self.s1 += s.sum(0).double()
        self.s2 += (s * s).sum(0).double()
        self.n += x.shape[0]

    def all_reduce_(self, comm) -> None:
        """Sum the totals over the ranks of `comm` (passes/distributed.py), in place."""
        for t in (self.xtx, self.xts, self.s1, self.s2):
            comm.sum_exact_(t)
        self.n = int(comm.sum_exact_(torch.tensor([self.n], dtype=torch.int64)))

    def solve(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(router weight [E, H] fp32, bias [E] fp32, R²): W = (XᵀX + λI')⁻¹ XᵀS, the intercept
        unregularised; R² = 1 - SSE/SST pooled over the experts (on the calibration tokens)."""
        h = self.xtx.shape[0] - 1
        lam = RIDGE * float(self.xtx.diagonal()[:h].mean()) + 1e-12
        reg = torch.full((h + 1,), lam, dtype=torch.float64, device=self.xtx.device)
        reg[h] = 0
        w = torch.linalg.solve(self.xtx + torch.diag(reg), self.xts)
        sse = self.s2 - 2 * (w * self.xts).sum(0) + (w * (self.xtx @ w)).sum(0)
        sst = self.s2 - self.s1 ** 2 / self.n
        r2 = 1 - float(sse.sum() / sst.sum()) if float(sst.sum()) > 0 else 1.0
        return w[:h].t().float(), w[h].float(), r2

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"neurons": self.neurons, "xtx": self.xtx, "xts": self.xts, "s1": self.s1, "s2": self.s2,
                "count": torch.tensor(self.n)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "RouterStats":
        return cls(t["neurons"], t["xtx"], t["xts"], t["s1"], t["s2"], int(t["count"]))

"""MoEfication's split: balanced spherical k-means over the neurons' weight vectors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

KMEANS_ITERS = 20  # Lloyd iterations of the balanced k-means (stops early once stable)


def _balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy capacity-limited assignment: (neuron, centroid) pairs by decreasing similarity,
    each neuron to the first centroid that still has room (`size` neurons each)."""
    n, k = sim.shape
    out, room, left = [-1] * n, [size] * k, n
    for pair in torch.argsort(sim.flatten().cpu(), descending=True, stable=True).tolist():
        i, e = divmod(pair, k)
        if out[i] < 0 and room[e] > 0:
            out[i], room[e], left = e, room[e] - 1, left - 1
            if not left:
                break
    return torch.tensor(out, device=sim.device)


@torch.no_grad()
def split_experts(w_gate: torch.Tensor, w_up: torch.Tensor, num_experts: int, seed: int = 0) -> torch.Tensor:
    """[E, I/E] neuron indices (ascending) of each expert: balanced spherical k-means over the rows
    of [W_gate, W_up] (MoEfication's parameter clustering). Deterministic for a given seed."""
    inter = w_gate.shape[0]
    v = F.normalize(torch.cat([w_gate, w_up], 1).float(), dim=1)
    start = torch.randperm(inter, generator=torch.Generator().manual_seed(seed))[:num_experts]
    centroids, assign = v[start.to(v.device)], None
    for _ in range(KMEANS_ITERS):
        new = _balanced_assign(v @ centroids.t(), inter // num_experts)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, assign, v), dim=1)
    return torch.argsort(assign, stable=True).view(num_experts, -1)  # stable: ascending within an expert

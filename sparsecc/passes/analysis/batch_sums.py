"""fp64 sums kept per calibration batch and folded in global batch order: the same bits in one
process and over N ranks (passes/distributed.py).

Adding fp64 terms in another order can change the last bits of the sum (an fp64 Σx² of fp32
inputs holds 48-bit terms: little room before rounding). So a pass keeps each batch's partial sum
apart (`add`), and after the scope `fold` gathers every rank's partials and adds them batch by
batch in global order, as one process adds them. Partials are [features]-sized per batch; an
[in, in] matrix is summed as fp32 partials in fp64 instead (exact in any order: analysis/hessian.py).
"""
from __future__ import annotations

import torch


class BatchSums:
    """{name: {global batch: fp64 partial}} until folded."""

    def __init__(self):
        self.parts: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, name: str, batch: int, part: torch.Tensor) -> None:
        parts = self.parts.setdefault(name, {})
        parts[batch] = parts[batch] + part if batch in parts else part  # a module called twice in one batch

    def fold(self, name: str, shape, device, comm) -> torch.Tensor:
        """Σ of every rank's partials of `name` in global batch order (zeros if none). A collective:
        every rank calls it for the same names in the same order."""
        acc = torch.zeros(shape, dtype=torch.float64, device=device)
        for part in comm.gather_in_order(self.parts.pop(name, {}), shape, torch.float64, device):
            acc += part
        return acc

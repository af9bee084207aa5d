"""Calibration over torch.distributed ranks, bitwise equal to one process.

`sparsify_` and `calibrate` called inside an initialised process group of N > 1 ranks (gloo on
CPU, NCCL on CUDA; every rank holding the same model and the same full list of batches) give each
rank a contiguous slice of the batches, reduce the statistics of each block exactly, and spread
the pruning solves: one owner per linear plans it and broadcasts its decision. Every rank ends
with the model the single-process run makes.

Exactness, per statistic: sums whose order does not change the result (fp32 partials added in
fp64: Hessians, refit H, router sums, analysis/hessian.py; integer counts; maxima) are
all-reduced; the others (fp64 column sums, losses) are gathered per batch and folded in global
batch order, as one process folds them (analysis/batch_sums.py); sampled values (CATS) are drawn
per batch from a generator seeded by its global index and gathered. A pass without a `reduce`
refuses to run on N > 1 ranks (passes/base.py).

`Comm` is the world of one process (every method the identity); `current_comm()` picks.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Callable

import torch

from ..errors import DistributedError


class Comm:
    """One process: rank 0 of a world of 1; every collective is the identity."""

    rank, world = 0, 1

    def shard(self, batches: list) -> list[int]:
        """The global indices of the batches this rank calibrates on."""
        return list(range(len(batches)))

    def sum_exact_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (exact only for what sums exactly in any order)."""
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of `t` over the ranks, in place."""
        return t

    def gather_in_order(self, per_batch: dict[int, torch.Tensor], shape, dtype, device) -> list[torch.Tensor]:
        """Every rank's per-batch tensors ({global batch: tensor of `shape`}), in global batch order."""
        return [per_batch[b].to(device) for b in sorted(per_batch)]

    def gather_varlen_in_order(self, per_batch: dict[int, torch.Tensor], dtype, device) -> list[torch.Tensor]:
        """gather_in_order for 1-D tensors whose lengths differ from batch to batch."""
        return [per_batch[b].to(device) for b in sorted(per_batch)]

    def decide(self, name: str, cost: float, compute: Callable[[], dict], device=None) -> dict[str, torch.Tensor]:
        """compute() -> {key: tensor}, run by one rank and broadcast (`name` a linear, `cost` its work)."""
        return compute()

    def agree(self, ok: bool, what: str, error: str = "") -> None:
        """Every rank says whether `what` went well; raises on the ranks that did when one did not."""


class DistComm(Comm):
    """The ranks of a torch.distributed process group (the default one)."""

    def __init__(self, group=None):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        # NCCL only moves CUDA tensors; gloo moves CPU ones
        nccl = "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.load = [0.0] * self.world  # the planning work given to each rank so far (decide)

    # the collectives, on tensors moved to the backend's device and back
    def _all_reduce_(self, t: torch.Tensor, op) -> torch.Tensor:
        w = t.to(self.device)
        self.dist.all_reduce(w, op=op, group=self.group)
        if w is not t:
            t.copy_(w)
        return t

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t, group=self.group)
        return out

    def _broadcast(self, t: torch.Tensor | None, src: int, nbytes: int) -> torch.Tensor:
        """The bytes of `t` (on rank `src`) on every rank, as a uint8 tensor: any dtype, bool included."""
        if self.rank == src:
            buf = t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes:
            self.dist.broadcast(buf, src, group=self.group)
        return buf

    def _broadcast_bytes(self, data: bytes | None, src: int) -> bytes:
        n = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64)
        self._all_reduce_(n, self.dist.ReduceOp.SUM)  # only src adds a length: its length everywhere
        buf = self._broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else
                              torch.empty(0, dtype=torch.uint8), src, int(n))
        return data if self.rank == src else bytes(buf.cpu().numpy())

    def shard(self, batches):
        n = len(batches)
        digest = torch.frombuffer(bytearray(batches_digest(batches)), dtype=torch.uint8)
        differ = [r for r, d in enumerate(self._all_gather(digest)) if not torch.equal(d.cpu(), digest)]
        if differ:
            raise DistributedError(f"rank {self.rank}: ranks {differ} were given other calibration batches than this "
                                   f"one; give every rank the same full list of batches (sparsecc gives each rank "
                                   f"its share)")
        if n < self.world:
            raise DistributedError(f"{n} calibration batches cannot be shared by {self.world} processes: give at "
                                   f"least one batch per process (split the samples into smaller batches)")
        r = self.rank
        return list(range(r * n // self.world, (r + 1) * n // self.world))

    def sum_exact_(self, t):
        return self._all_reduce_(t, self.dist.ReduceOp.SUM)

    def max_(self, t):
        return self._all_reduce_(t, self.dist.ReduceOp.MAX)

    def gather_in_order(self, per_batch, shape, dtype, device):
        ids = sorted(per_batch)
        counts = [int(c) for c in self._all_gather(torch.tensor([len(ids)], dtype=torch.int64))]
        most = max(counts)
        if most == 0:
            return []
        # padded to the largest share (all_gather moves equal shapes), with the batch index of each row
        index = torch.full((most,), -1, dtype=torch.int64)
        index[:len(ids)] = torch.tensor(ids, dtype=torch.int64)
        rows = torch.zeros((most, *shape), dtype=dtype, device=self.device)
        for i, b in enumerate(ids):
            rows[i] = per_batch[b]
        found = {}
        for c, idx, part in zip(counts, self._all_gather(index), self._all_gather(rows)):
            for i in range(c):
                found[int(idx[i])] = part[i].to(device)
        return [found[b] for b in sorted(found)]

    def gather_varlen_in_order(self, per_batch, dtype, device):
        ids = sorted(per_batch)
        lens = torch.tensor([per_batch[b].numel() for b in ids], dtype=torch.int64)
        flat = torch.cat([per_batch[b].reshape(-1).to(self.device, dtype) for b in ids]) if ids else \
            torch.empty(0, dtype=dtype, device=self.device)
        # every rank's (batches, values) first, then each padded to the largest (all_gather moves equal shapes)
        sizes = self._all_gather(torch.tensor([len(ids), flat.numel()], dtype=torch.int64))
        most_b, most_v = (max(int(s[i]) for s in sizes) for i in (0, 1))
        index = torch.full((2, most_b), -1, dtype=torch.int64)
        index[0, :len(ids)], index[1, :len(ids)] = torch.tensor(ids, dtype=torch.int64), lens
        values = torch.zeros(most_v, dtype=dtype, device=self.device)
        values[:flat.numel()] = flat
        found = {}
        for size, idx, vals in zip(sizes, self._all_gather(index), self._all_gather(values)):
            start = 0
            for i in range(int(size[0])):
                n = int(idx[1, i])
                found[int(idx[0, i])] = vals[start:start + n].to(device)
                start += n
        return [found[b] for b in sorted(found)]

    def decide(self, name, cost, compute, device=None):
        # the owner: the least loaded rank so far (ties: the lowest), the same on every rank with no
        # communication, since every rank plans the same linears in the same order
        owner = min(range(self.world), key=lambda r: (self.load[r], r))
        self.load[owner] += cost
        decision, error, head = None, None, None
        if self.rank == owner:
            try:
                decision = compute()
                head = {"tensors": {k: [str(t.dtype).removeprefix("torch."), list(t.shape), t.device.type == "cpu"]
                                    for k, t in decision.items()}}
            except Exception as e:
                error, head = e, {"error": f"{type(e).__name__}: {e}"}
        head = json.loads(self._broadcast_bytes(json.dumps(head).encode() if head is not None else None, owner))
        if "error" in head:
            if error is not None:
                raise error
            raise DistributedError(f"rank {owner} failed planning {name}: {head['error']}")
        out = {}
        for key, (dtype, shape, cpu) in head["tensors"].items():
            dtype = getattr(torch, dtype)
            numel = 1
            for s in shape:
                numel *= s
            buf = self._broadcast(decision[key] if decision is not None else None, owner,
                                  numel * dtype.itemsize)
            if decision is None:
                out[key] = buf.view(dtype).reshape(shape).to("cpu" if cpu or device is None else device)
        return decision if decision is not None else out

    def agree(self, ok, what, error=""):
        # the lowest failing rank, if any: world - rank is largest for it
        flag = torch.tensor([0 if ok else self.world - self.rank], dtype=torch.int64)
        self._all_reduce_(flag, self.dist.ReduceOp.MAX)
        if int(flag) == 0:
            return
        failed = self.world - int(flag)
        text = self._broadcast_bytes(error.encode() if self.rank == failed else None, failed).decode()
        if ok:
            raise DistributedError(f"rank {failed} failed {what}: {text}")


def current_comm() -> Comm:
    """DistComm inside an initialised process group of more than one rank, else the world of one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistComm()
    return Comm()


def batches_digest(batches: list) -> bytes:
    """sha256 of every tensor of every batch, with its key, dtype and shape (graph.calibration's
    `describe` hashes the token ids only: a differing attention_mask would pass it)."""
    h = hashlib.sha256(str(len(batches)).encode())
    for b in batches:
        items = b.items() if isinstance(b, Mapping) else [("", b)]
        for k, t in items:
            if isinstance(t, torch.Tensor):
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(f"{k}|{t!r}|".encode())
    return h.digest()

"""Bonsai's unit relevance from forward passes only (seed 004; Dery et al. 2024, "Everybody Prune
Now: Structured Pruning of LLMs with only Forward Passes"), for structured pruning's score="bonsai".

For the targeted modules (MLPs, attention modules: techniques/structured.py `unit_layout`), on the
dense model, after the first sweep:
  1. draw `samples` sub-models: every unit of module m kept independently with probability
     p_m = 1 - sparsity_m, clamped to [0.1, 0.9] so each unit is both kept and dropped in a tenth
     of the samples at least (a unit never dropped has no measurable effect);
  2. evaluate each: the mean next-token cross-entropy over the calibration tokens (padding
     skipped) with the dropped units zeroed — a forward pre-hook on the module's consumer linear
     (down / o) multiplies its input by the mask, each unit spanning `width` columns;
  3. regress the losses on the masks of all modules' units jointly, loss ≈ b0 + Σ_u β_u m_u
     (ridge, `fit_relevance`); relevance_u = -β_u: keeping a unit that lowers the loss is relevant.
ctx.stats["unit_relevance"][module] = float32 CPU tensor [units], higher = keep.

Cost: samples × batches forwards (`batches_per_sample` = k uses k batches per sample instead,
cycling through them, each sample's loss then taken relative to the dense model's on the same
batches: samples × k + batches forwards). All configs share one `samples` (the largest) and one
`seed` (the first module's); the masks come from a torch.Generator seeded with it.

Over N torch.distributed ranks each rank runs the (sample, batch) pairs of its own batches, and
the losses are gathered and averaged in global batch order: one process's relevance, bit for bit,
in 1/N of the forwards.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...graph.calibration import batch_loss, mean_loss
from ...techniques.structured import unit_layout
from ..base import AnalysisPass

KEEP_RANGE = (0.1, 0.9)  # the keep probability of a unit, whatever the sparsity


def fit_relevance(masks: torch.Tensor, losses: torch.Tensor, ridge: float = 0.1) -> torch.Tensor:
    """-β of the ridge fit losses ≈ b0 + masks @ β (masks [samples, units] of 0/1, losses
    [samples]). The intercept is not penalised (masks and losses centred); the penalty is
    λ = ridge × the mean diagonal of XᵀX (X the centred masks), so `ridge` is free of the sample
    count and the keep probabilities. Solved in the dual, β = Xᵀ(XXᵀ + λI)⁻¹y (samples² memory,
    the usual case samples < units), in float64."""
    x = masks.double() - masks.double().mean(0)
    y = losses.double() - losses.double().mean()
    lam = ridge * float((x * x).sum()) / x.shape[1]
    gram = x @ x.T + max(lam, 1e-12) * torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return -(x.T @ torch.linalg.solve(gram, y))


WHO = "StructuredConfig(score='bonsai')"


class CollectUnitRelevance(AnalysisPass):
    name = "collect_unit_relevance"
    produces = ("unit_relevance",)
    whole_model = True
    after = ()  # the first sweep, on the dense model; it observes nothing there, all work is in finish

    def __init__(self, targets: dict, ridge: float = 0.1, batches_per_sample: int | None = None,
                 progress: bool | None = None):
        super().__init__(modules=[])
        self.targets = dict(targets)  # {module: (StructuredConfig, spec)}
        cfgs = [cfg for cfg, _ in self.targets.values()]
        self.samples = max((getattr(c, "samples", 64) for c in cfgs), default=64)
        self.seed = getattr(cfgs[0], "seed", 0) if cfgs else 0
        if batches_per_sample is not None and batches_per_sample < 1:
            raise ValueError(f"batches_per_sample must be None (all) or at least 1, got {batches_per_sample!r}")
        self.ridge, self.batches_per_sample = ridge, batches_per_sample
        self.progress = progress  # None: ctx.progress where the pipeline sets it, else no bar

    @classmethod
    def from_targets(cls, targets):
        return cls(targets)

    def reduce(self, ctx, names, comm):
        """Nothing is observed scope by scope; `finish` shares its forwards among the ranks."""

    @torch.no_grad()
    def finish(self, ctx):
        model, batches = ctx.model, ctx.batches
        if not self.targets:
            return  # on every rank alike: none calls the collectives below
        layout = {}  # module -> (consumer linear, width, units, keep probability)
        for name, (cfg, spec) in self.targets.items():
            child, width = unit_layout(spec)
            lin = model.get_submodule(f"{name}.{child}")
            keep = min(max(1 - cfg.sparsity, KEEP_RANGE[0]), KEEP_RANGE[1])
            layout[name] = (lin, width, lin.in_features // width, keep)
        sizes = [n for _, _, n, _ in layout.values()]
        p = torch.cat([torch.full((n,), q) for _, _, n, q in layout.values()])
        g = torch.Generator().manual_seed(self.seed)
        masks = torch.rand(self.samples, p.numel(), generator=g) < p  # [samples, all units], drawn up front
        current: dict[str, torch.Tensor] = {}

        def hook(name):
            def pre(mod, args):
                m = current.get(name)
                return args if m is None else (args[0] * m.to(args[0].dtype), *args[1:])
            return pre

        # the losses of (sample, batch) pairs on this rank's batches, [samples + 1, 2] (loss sum, tokens)
        # per batch, the last row the dense model's; every rank's gathered after, in global batch order
        comm, local = ctx.comm, dict(zip(ctx.batch_ids, batches))
        n = int(comm.sum_exact_(torch.tensor([len(batches)], dtype=torch.int64)))  # every rank's batches
        k = n if self.batches_per_sample is None else min(self.batches_per_sample, n)
        uses = [[(s * k + j) % n for j in range(k)] for s in range(self.samples)]
        parts = {b: torch.zeros(self.samples + 1, 2, dtype=torch.float64) for b in local}
        handles = [lin.register_forward_pre_hook(hook(m)) for m, (lin, *_) in layout.items()]
        try:  # with k < all batches, a sample's loss is relative to the dense model's on its batches
            if k < n:
                for b, batch in local.items():
                    parts[b][self.samples] = torch.tensor(batch_loss(model, batch, WHO), dtype=torch.float64)
            show = self.progress if self.progress is not None else getattr(ctx, "progress", False)
            for s in tqdm(range(self.samples), desc="sparsecc (unit relevance)", unit="sample", disable=not show,
                          leave=False):
                for m, part in zip(layout, masks[s].split(sizes)):
                    lin, width = layout[m][:2]  # a unit spans `width` consecutive input columns
                    current[m] = part.to(lin.weight.device, torch.float32).repeat_interleave(width)
                for b in uses[s]:
                    if b in local:
                        parts[b][s] = torch.tensor(batch_loss(model, local[b], WHO), dtype=torch.float64)
        finally:
            current.clear()
            for h in handles:
                h.remove()
        every = comm.gather_in_order(parts, (self.samples + 1, 2), torch.float64, "cpu")  # by global batch

        def loss(row, used):  # mean_loss over the batches `used`, folded in their order as one process does
            return mean_loss([(float(every[b][row, 0]), int(every[b][row, 1])) for b in used], WHO)

        losses = torch.tensor([loss(s, uses[s]) - (loss(self.samples, uses[s]) if k < n else 0.0)
                               for s in range(self.samples)], dtype=torch.float64)
        relevance = fit_relevance(masks, losses, self.ridge).float()
        table = ctx.stats.setdefault("unit_relevance", {})
        for name, part in zip(layout, relevance.split(sizes)):
            table[name] = part.clone()

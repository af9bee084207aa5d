"""How much each decoder block matters, for LayerDropConfig (techniques/layer_drop.py), on the dense model.

score="bi": Block Influence, ShortGPT (Men et al. 2024) eq. (1),

    BI_i = 1 - E_{X,t} [ X_{i,t}ᵀ X_{i+1,t} / (‖X_{i,t}‖₂ ‖X_{i+1,t}‖₂) ],

X_{i,t} the hidden state of token t entering block i, X_{i+1,t} the one leaving it: one minus the
mean cosine similarity over the calibration tokens (padding skipped), accumulated as a sum and a
count in float64 from hooks on the blocks (the pipeline's `observe_module`), folded in global
batch order (batch_sums.py; the same bits over N ranks).

score="loss": the mean next-token cross-entropy over the calibration tokens with block i alone
skipped (its output replaced by its input), minus the dense model's: one forward over the batches
per block, in `finish` (each rank its own batches, averaged in global batch order).

score="l0": learned hard-concrete gates (L0 regularisation; Louizos et al. 2018, Sheared-LLaMA, Xia
et al. 2024), in `finish`, with every weight frozen (requires_grad off, restored) and the model in
eval mode (restored): one gate z_i ~ HardConcrete(log_alpha_i) per block (prune/hard_concrete.py,
noise from a torch.Generator seeded with `seed`), the block's output hidden state replaced by
x + z_i (block(x) - x) (x its input, a forward hook); Adam (`lr`, unit_gates.py's betas) descends on
log_alpha, starting at P(z != 0) = `init_keep`, for `steps` steps of one calibration batch each
(cycling), on the mean next-token loss + lambda1 (E - T) + lambda2 (E - T)², E = the expected number
of blocks kept (sum of P(z != 0)) and T = L - n, annealed linearly from init_keep * L over the first
`warmup` share of the steps; the multipliers (from 0) ascend with `lambda_lr`. The score is the
learned log_alpha (higher = keep). Cost: `steps` forwards and backwards of one batch. One process
only (a training loop: it refuses torch.distributed runs).

ctx.stats["block_influence"][container] = {block name: score}; lower = removed first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import CalibrationError, DistributedError
from ...graph.calibration import batch_loss, mean_loss, token_loss
from ...prune.hard_concrete import expected_l0, lagrangian, log_alpha_for, sample_gates
from ..base import AnalysisPass
from ..blockwise import hidden_of, hidden_slot, slot_value
from .batch_sums import BatchSums
from .unit_gates import GateOptimiser, annealed, frozen_eval, require_autograd

L0 = "LayerDropConfig(score='l0')"


class CollectBlockInfluence(AnalysisPass):
    name = "collect_block_influence"
    produces = ("block_influence",)
    whole_model = True
    after = ()  # the first sweep, on the dense model

    def __init__(self, stacks: dict):
        super().__init__(modules=[])
        self.stacks = dict(stacks)  # {container: (LayerDropConfig, BlockStack)}

    @classmethod
    def from_targets(cls, targets):
        return cls(targets)

    def setup(self, ctx):
        super().setup(ctx)
        if ctx.comm.world > 1 and any(cfg.score == "l0" for cfg, _ in self.stacks.values()):
            raise DistributedError(f"{L0} trains its gates in one process: run it without torchrun, or use "
                                   "score='bi' or 'loss'")
        self._cos = BatchSums()  # block -> (Σ cos, tokens) per batch, folded in global batch order
        self._bi: dict[str, torch.Tensor] = {}

    def hooked_modules(self, ctx):
        return [b for cfg, spec in self.stacks.values() if cfg.score == "bi" for b in spec.blocks]

    def observe_module(self, ctx, name, x, y):
        cos = F.cosine_similarity(x.double(), y.double(), dim=-1)
        self._cos.add(name, ctx.global_batch, torch.stack([cos.sum(), torch.tensor(cos.numel(), dtype=torch.float64)]))

    def reduce(self, ctx, names, comm):
        for name in names:  # the scope's block, over every rank's batches
            self._bi[name] = self._cos.fold(name, (2,), "cpu", comm)

    @torch.no_grad()
    def finish(self, ctx):
        table = ctx.stats.setdefault("block_influence", {})
        for container, (cfg, spec) in self.stacks.items():
            if cfg.score == "bi":
                if any(b not in self._bi or self._bi[b][1] == 0 for b in spec.blocks):
                    raise CalibrationError(f"{container}: a block never ran on the calibration batches")
                table[container] = {b: 1.0 - float(self._bi[b][0]) / float(self._bi[b][1]) for b in spec.blocks}
            elif cfg.score == "l0":
                show = getattr(ctx, "progress", False)
                learned = gated_blocks(ctx.model, ctx.batches, spec.blocks, cfg, progress=show)
                table[container] = dict(zip(spec.blocks, learned.tolist()))
            else:
                dense, *skipped = skipped_losses(ctx, [None, *spec.blocks])
                table[container] = {b: loss - dense for b, loss in zip(spec.blocks, skipped)}
        self._bi.clear()


def skipped_losses(ctx, skips: list) -> list[float]:
    """For each of `skips` (a block's module name, or None), the mean next-token cross-entropy over
    the calibration batches' real tokens with that block passing its input through unchanged. Each
    rank runs its own batches; the (sum, tokens) per batch are gathered and averaged in global
    batch order, as one process averages them."""
    who = "LayerDropConfig(score='loss')"
    parts = {}
    for b, batch in zip(ctx.batch_ids, ctx.batches):
        parts[b] = torch.tensor([skipped_loss(ctx.model, batch, skip) for skip in skips], dtype=torch.float64)
    every = ctx.comm.gather_in_order(parts, (len(skips), 2), torch.float64, "cpu")
    return [mean_loss([(float(p[i, 0]), int(p[i, 1])) for p in every], who) for i in range(len(skips))]


def skipped_loss(model, batch, skip: str | None = None) -> tuple[float, int]:
    """`batch_loss` (sum, tokens) of one batch, with block `skip` (a module name) passing its input
    through unchanged."""
    handle = None
    if skip is not None:
        def identity(mod, args, kwargs, out):
            slot = hidden_slot(args, kwargs)
            if slot is None:
                raise CalibrationError(f"{skip} takes no hidden-state tensor (first argument or hidden_states=), "
                                       "so it cannot be skipped to score it")
            x = slot_value(slot, args, kwargs)
            return (x, *out[1:]) if isinstance(out, tuple) else x
        handle = model.get_submodule(skip).register_forward_hook(identity, with_kwargs=True)
    try:
        return batch_loss(model, batch, "LayerDropConfig(score='loss')")
    finally:
        if handle is not None:
            handle.remove()


def gated_blocks(model, batches, blocks, cfg, progress: bool = False, history: list | None = None) -> torch.Tensor:
    """The learned log_alpha (float32 CPU, one per block of `blocks`, module names) of hard-concrete
    gates x + z (block(x) - x) trained toward len(blocks) - cfg.n blocks kept (the module docstring).
    Each step's (loss, E) is appended to `history` where given. No weight is written."""
    require_autograd(L0)
    if not batches:
        raise CalibrationError(f"{L0} needs calibration batches")
    mods = [model.get_submodule(b) for b in blocks]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    count, keep = len(mods), float(len(mods) - cfg.n)
    log_alpha = torch.full((count,), log_alpha_for(cfg.init_keep), device=device, requires_grad=True)
    lambdas = torch.zeros(2, device=device, requires_grad=True)
    opt = GateOptimiser(log_alpha, lambdas, cfg.lr, cfg.lambda_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    current: list[torch.Tensor | None] = [None]

    def hook(i, name):
        def gate(mod, args, kwargs, out):
            slot, y = hidden_slot(args, kwargs), hidden_of(out)
            if slot is None or y is None:
                raise CalibrationError(f"{name} takes or returns no hidden-state tensor (first argument or "
                                       f"hidden_states=), so {L0} cannot gate it")
            x = slot_value(slot, args, kwargs)
            z = current[0][i].to(y)
            gated = x + z * (y - x)
            return (gated, *out[1:]) if isinstance(out, (tuple, list)) else gated
        return gate

    handles = [m.register_forward_hook(hook(i, b), with_kwargs=True) for i, (b, m) in enumerate(zip(blocks, mods))]
    bar = tqdm(range(cfg.steps), desc="sparsecc (L0 block gates)", unit="step", disable=not progress, leave=False)
    try:
        with frozen_eval(model):
            for step in bar:
                current[0] = sample_gates(log_alpha, generator=g)
                total, n_tokens = token_loss(model, batches[step % len(batches)], L0)
                if n_tokens == 0:
                    raise CalibrationError(f"{L0} needs calibration sequences of 2 real tokens at least "
                                           "(a next-token loss)")
                loss = total / n_tokens
                expected = expected_l0(log_alpha).sum()
                target = annealed(cfg.init_keep * count, keep, step, cfg.steps, cfg.warmup)  # toward L - n
                opt.step(loss + lagrangian(expected, target, lambdas[0], lambdas[1]))
                loss, expected = float(loss.detach()), float(expected.detach())
                if history is not None:
                    history.append((loss, expected))
                bar.set_postfix(loss=f"{loss:.3f}", kept=f"{expected:.2f}", target=f"{keep:.0f}")
    finally:
        bar.close()
        current[0] = None
        for h in handles:
            h.remove()
    return log_alpha.detach().float().cpu()

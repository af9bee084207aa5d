"""How much each decoder block matters, for LayerDropConfig (techniques/layer_drop.py), on the dense model.

score="bi": Block Influence, ShortGPT (Men et al. 2024) eq. (1),

    BI_i = 1 - E_{X,t} [ X_{i,t}ᵀ X_{i+1,t} / (‖X_{i,t}‖₂ ‖X_{i+1,t}‖₂) ],

X_{i,t} the hidden state of token t entering block i, X_{i+1,t} the one leaving it: one minus the
mean cosine similarity over the calibration tokens (padding skipped), accumulated as a sum and a
count in float64 from hooks on the blocks (the pipeline's `observe_module`).

score="loss": the mean next-token cross-entropy over the calibration tokens with block i alone
skipped (its output replaced by its input), minus the dense model's: one forward over the batches
per block, in `finish`.

ctx.stats["block_influence"][container] = {block name: score}; lower = removed first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import CalibrationError
from ...graph.calibration import batch_loss, mean_loss
from ..base import AnalysisPass
from ..blockwise import slot_value, hidden_slot


class CollectBlockInfluence(AnalysisPass):
    name = "collect_block_influence"
    produces = ("block_influence",)
    whole_model = True
    after = ()  # the first sweep, on the dense model

    def __init__(self, stacks: dict):
        super().__init__(modules=[])
        self.stacks = dict(stacks)  # {container: (LayerDropConfig, BlockStack)}
        self._cos: dict[str, list[float]] = {}  # block -> [sum of cos, tokens]

    @classmethod
    def from_targets(cls, targets):
        return cls(targets)

    def hooked_modules(self, ctx):
        return [b for cfg, spec in self.stacks.values() if cfg.score == "bi" for b in spec.blocks]

    def observe_module(self, ctx, name, x, y):
        cos = F.cosine_similarity(x.double(), y.double(), dim=-1)
        acc = self._cos.setdefault(name, [0.0, 0])
        acc[0] += float(cos.sum())
        acc[1] += cos.numel()

    @torch.no_grad()
    def finish(self, ctx):
        table = ctx.stats.setdefault("block_influence", {})
        for container, (cfg, spec) in self.stacks.items():
            if cfg.score == "bi":
                if any(self._cos.get(b, (0, 0))[1] == 0 for b in spec.blocks):
                    raise CalibrationError(f"{container}: a block never ran on the calibration batches")
                table[container] = {b: 1.0 - self._cos[b][0] / self._cos[b][1] for b in spec.blocks}
            else:
                dense = skipped_loss(ctx.model, ctx.batches)
                table[container] = {b: skipped_loss(ctx.model, ctx.batches, skip=b) - dense for b in spec.blocks}
        self._cos.clear()


def skipped_loss(model, batches, skip: str | None = None) -> float:
    """The mean next-token cross-entropy over the batches' real tokens, with block `skip` (a module
    name) passing its input through unchanged."""
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
        return mean_loss([batch_loss(model, batch, "LayerDropConfig(score='loss')") for batch in batches],
                         "LayerDropConfig(score='loss')")
    finally:
        if handle is not None:
            handle.remove()



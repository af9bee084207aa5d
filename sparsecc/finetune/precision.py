"""Mixed precision for fine-tuning half-precision models: fp32 master weights, fp16 loss scaling.

AdamW's update of a weight is about lr (1e-4). Near 0.02 bfloat16 values are 2^-13 ≈ 1.2e-4 apart
and float16 ones 2^-16 ≈ 1.5e-5: made in the model's own dtype, most bfloat16 updates round away
and float16 ones keep few of their bits. As in Micikevicius et al. 2018 ("Mixed Precision Training"), `Masters` keeps an
fp32 copy of every half-precision tensor trained: the model computes in its dtype, each step's
gradients are moved up to the copies, AdamW steps on them, and they are rounded back into the model.
float16 also underflows small gradients: the loss is multiplied by a scale S before the backward
and the gradients divided by it after; a step whose gradients overflow is skipped and halves S,
and S doubles after every GROWTH steps without overflow (S starts at 2^16).
"""
from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)
INIT_SCALE, GROWTH = 2.0 ** 16, 100


class Masters:
    """The tensors AdamW updates for the model's trainable `params`: an fp32 copy of each half-
    precision one when `enabled`, the tensor itself otherwise; and float16's loss scale."""

    def __init__(self, params: list[torch.Tensor], enabled: bool = True):
        self.params = params
        self.tensors = [p.detach().float().clone().requires_grad_(True) if enabled and p.dtype in HALF else p
                        for p in params]
        self.scaled = enabled and any(p.dtype == torch.float16 for p in params)
        self.scale, self.good, self.skipped = (INIT_SCALE if self.scaled else 1.0), 0, 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale if self.scaled else loss).backward()

    def step(self, opt, clip: float | None) -> bool:
        """Move the gradients to the masters (unscaled), clip their norm, step `opt` on them and round
        them back into the model; False (nothing changed) when a gradient overflowed under scaling."""
        for p, m in zip(self.params, self.tensors):
            if p.grad is None:
                continue
            if m is not p:
                m.grad, p.grad = p.grad.float(), None
            if self.scaled:
                m.grad.div_(self.scale)
        if self.scaled and not all(bool(torch.isfinite(m.grad).all()) for m in self.tensors if m.grad is not None):
            self.scale, self.good, self.skipped = self.scale / 2, 0, self.skipped + 1
            opt.zero_grad(set_to_none=True)
            return False
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.tensors, clip)
        opt.step()
        self.copy_back()
        if self.scaled:
            self.good += 1
            if self.good % GROWTH == 0:
                self.scale *= 2
        return True

    @torch.no_grad()
    def copy_back(self) -> None:
        """Round the masters into the model's tensors."""
        for p, m in zip(self.params, self.tensors):
            if m is not p:
                p.copy_(m)

    def zero_grad(self, opt) -> None:
        opt.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def state(self) -> dict:
        return {"scale": self.scale, "good": self.good, "skipped": self.skipped}

    def load_state(self, state: dict) -> None:
        self.scale = float(state.get("scale", self.scale))
        self.good, self.skipped = int(state.get("good", 0)), int(state.get("skipped", 0))

"""Learned unit gates: L0 regularisation with hard-concrete masks (seed 004; Louizos et al. 2018;
Sheared-LLaMA, Xia et al. 2024), for L0Config (techniques/l0.py).

For the targeted modules (MLPs, attention modules: techniques/structured.py `unit_layout`), on the
dense model, after the first sweep, with every weight frozen:
  1. one log_alpha per unit (an MLP channel, a query head, or a key/value group with
     unit="kv_group"), all starting at P(z != 0) = `init_keep`;
  2. each step draws gates z ~ HardConcrete(log_alpha) (prune/hard_concrete.py, noise from a
     torch.Generator seeded with `seed`), multiplies the consumer linear's (down / o) input by them
     — a forward pre-hook, each gate spanning its unit's columns — and takes the mean next-token
     cross-entropy of one calibration batch (cycling through them, padding skipped);
  3. adds, per module, lambda1 (E - T) + lambda2 (E - T)², E = mean P(z != 0) of its gates (its
     expected kept share) and T the share structured pruning keeps (1 - target, rounded as it
     rounds), T annealed linearly from `init_keep` over the first `warmup` share of the steps (as
     Sheared-LLaMA warms its target up); Adam descends on log_alpha (`lr`, beta1 0.5) and ascends on
     the multipliers (`lambda_lr`), which start at 0, so E is driven to T while the loss decides
     which units stay.
ctx.stats["unit_gates"][module] = the learned log_alpha, float32 CPU [channels or query heads]
(a group's log_alpha split evenly over its heads), higher = keep; `history` holds each step's loss
and mean |E - T|, `expected` each module's final E.

Cost: `steps` forwards and backwards of one batch through the whole model (activations for the
backward held: a training step's memory, less the weights' gradients and optimiser state). The
weights' requires_grad is switched off for the run and restored; no weight is written.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ...errors import CalibrationError
from ...graph.calibration import token_loss
from ...graph.heads import AttentionHeads
from ...prune.hard_concrete import expected_l0, lagrangian, log_alpha_for, sample_gates
from ...techniques.structured import kept_count, unit_layout, whole_groups
from ..base import AnalysisPass

WHO = "L0Config"
#: Adam's betas for log_alpha: less momentum than the default 0.9, so the expected size settles on the
#: target instead of swinging around it (the multipliers keep the default)
BETAS = (0.5, 0.999)


def require_autograd(who: str) -> None:
    """A one-line CalibrationError where torch.inference_mode() would keep the gates from training."""
    if torch.is_inference_mode_enabled():
        raise CalibrationError(f"{who} trains gates with autograd, which torch.inference_mode() switches off: "
                               "call sparsify_ / calibrate outside it (torch.no_grad() is fine)")


@contextmanager
def frozen_eval(model):
    """The model in eval mode (no dropout: the gates' noise is the only randomness, deterministic given
    the seed) with every parameter's requires_grad off; both restored on exit, also on an error."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)


def annealed(start, end, step: int, steps: int, warmup: float):
    """The target size at `step` (0-based): linear from `start` to `end` over the first `warmup` share
    of the `steps`, then `end` (Sheared-LLaMA's target warm-up)."""
    ramp = min(1.0, (step + 1) / max(warmup * steps, 1))
    return start + (end - start) * ramp


class GateOptimiser:
    """Adam descending on the gates' log_alpha (`lr`, betas BETAS) and ascending on the Lagrange
    multipliers (`lambda_lr`): `step(objective)` backpropagates the objective and moves both."""

    def __init__(self, log_alpha: torch.Tensor, lambdas: torch.Tensor, lr: float, lambda_lr: float):
        self.descent = torch.optim.Adam([log_alpha], lr=lr, betas=BETAS)
        self.ascent = torch.optim.Adam([lambdas], lr=lambda_lr, maximize=True)

    def step(self, objective: torch.Tensor) -> None:
        self.descent.zero_grad(set_to_none=True)
        self.ascent.zero_grad(set_to_none=True)
        objective.backward()
        self.descent.step()
        self.ascent.step()


def gate_layout(config, spec, in_features: int) -> tuple[int, int, int]:
    """(gates, consumer columns per gate, gates kept at the end) of one module: a gate per channel, per
    query head, or per key/value group where whole groups go (structured.py's counts)."""
    width = unit_layout(spec)[1]
    if not isinstance(spec, AttentionHeads):  # an MLP: channels
        return in_features, width, kept_count(config, in_features)
    if whole_groups(config, spec):
        return spec.kv_heads, width * spec.groups, kept_count(config, spec.kv_heads)
    return spec.heads, width, kept_count(config, spec.groups) * spec.kv_heads


class CollectUnitGates(AnalysisPass):
    name = "collect_unit_gates"
    produces = ("unit_gates",)
    whole_model = True
    after = ()  # the first sweep, on the dense model; it observes nothing there, all work is in finish

    def __init__(self, targets: dict, progress: bool | None = None):
        super().__init__(modules=[])
        self.targets = dict(targets)  # {module: (L0Config, spec)}
        cfgs = [cfg for cfg, _ in self.targets.values()]
        first = cfgs[0] if cfgs else None
        self.steps = max((c.steps for c in cfgs), default=0)
        self.lr, self.lambda_lr = getattr(first, "lr", 0.1), getattr(first, "lambda_lr", 0.5)
        self.init_keep, self.seed = getattr(first, "init_keep", 0.95), getattr(first, "seed", 0)
        self.warmup = getattr(first, "warmup", 0.5)
        self.progress = progress  # None: ctx.progress where the pipeline sets it, else no bar
        self.history: list[tuple[float, float]] = []  # (loss, mean |E - T|) per step
        self.expected: dict[str, float] = {}          # module -> final expected kept share

    @classmethod
    def from_targets(cls, targets):
        return cls(targets)

    def finish(self, ctx):
        if not self.targets:
            return
        require_autograd(WHO)
        model, batches = ctx.model, ctx.batches
        layout = {}  # module -> (consumer linear, columns per gate, gates, kept share)
        for name, (cfg, spec) in self.targets.items():
            lin = model.get_submodule(f"{name}.{unit_layout(spec)[0]}")
            gates, width, kept = gate_layout(cfg, spec, lin.in_features)
            layout[name] = (lin, width, gates, kept / gates)
        device = next(iter(layout.values()))[0].weight.device
        sizes = [n for _, _, n, _ in layout.values()]
        log_alpha = torch.full((sum(sizes),), log_alpha_for(self.init_keep), device=device, requires_grad=True)
        lambdas = torch.zeros(2, len(layout), device=device, requires_grad=True)  # lambda1, lambda2 per module
        keep = torch.tensor([t for *_, t in layout.values()], device=device)
        opt = GateOptimiser(log_alpha, lambdas, self.lr, self.lambda_lr)
        g = torch.Generator().manual_seed(self.seed)
        current: dict[str, torch.Tensor] = {}

        def hook(name):
            def pre(mod, args):
                z = current.get(name)
                return args if z is None else (args[0] * z.to(args[0]), *args[1:])  # its dtype and device
            return pre

        handles = [lin.register_forward_pre_hook(hook(n)) for n, (lin, *_) in layout.items()]
        show = self.progress if self.progress is not None else getattr(ctx, "progress", False)
        bar = tqdm(range(self.steps), desc="sparsecc (L0 gates)", unit="step", disable=not show, leave=False)
        self.history = []
        try:
            with frozen_eval(model):
                for step in bar:
                    z = sample_gates(log_alpha, generator=g)
                    for m, part in zip(layout, z.split(sizes)):
                        current[m] = part.repeat_interleave(layout[m][1])  # a gate spans its unit's columns
                    total, count = token_loss(model, batches[step % len(batches)], WHO)
                    if count == 0:
                        raise CalibrationError(f"{WHO} needs calibration sequences of 2 real tokens at least "
                                               "(a next-token loss)")
                    loss = total / count
                    expected = torch.stack([e.mean() for e in expected_l0(log_alpha).split(sizes)])
                    target = annealed(self.init_keep, keep, step, self.steps, self.warmup)  # toward T
                    opt.step(loss + lagrangian(expected, target, lambdas[0], lambdas[1]).sum())
                    loss, expected = float(loss.detach()), expected.detach()
                    self.history.append((loss, float((expected - keep).abs().mean())))
                    bar.set_postfix(loss=f"{loss:.3f}", kept=f"{float(expected.mean()):.3f}",
                                    target=f"{float(keep.mean()):.3f}")
        finally:
            bar.close()
            current.clear()
            for h in handles:
                h.remove()
        learned = log_alpha.detach().float().cpu()
        final = expected_l0(learned)
        table = ctx.stats.setdefault("unit_gates", {})
        for (name, (cfg, spec)), part, share in zip(self.targets.items(), learned.split(sizes), final.split(sizes)):
            if isinstance(spec, AttentionHeads) and whole_groups(cfg, spec):  # scores per query head, summed per group
                part = (part / spec.groups).repeat_interleave(spec.groups)
            table[name] = part.clone()
            self.expected[name] = float(share.mean())

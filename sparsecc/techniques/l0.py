"""Learned structured masks: L0 regularisation with hard-concrete gates (seed 004; Louizos et al. 2018;
Sheared-LLaMA, Xia et al. 2024), then the units removed for real, as structured pruning removes them.

    sparsecc.sparsify_(model, {"re:.*mlp": L0Config(target=0.5, steps=200)}, batches)

Every unit of every targeted module (an MLP's intermediate channel, an attention module's query head,
or its key/value group with `unit="kv_group"`: techniques/structured.py) gets a gate z drawn from a
hard-concrete distribution with a learned log_alpha (prune/hard_concrete.py); the consumer linear
(down / o) sees its input multiplied by z. With the model's weights frozen, the gates are trained by
Adam on the calibration batches for `steps` steps, one batch a step, minimising the next-token loss
plus Sheared-LLaMA's Lagrangian lambda1 (E - T) + lambda2 (E - T)² per module, E the expected share of
its units kept and T = 1 - `target` (reached after a `warmup` share of the steps, starting from
`init_keep`), the multipliers maximised; so each module's expected size is
driven to the target while the loss decides *which* units stay (passes/analysis/unit_gates.py). The
learned log_alpha is then the unit's score, and structured pruning removes exactly the `target`
share of the units with the lowest scores in every module (the same count as StructuredConfig's
`sparsity`), optionally re-fitting the consumer (`update="refit"`). The model's weights are never
changed by the training; only the final removal changes the model.

All L0 configs of one recipe train together in one run: its steps are the largest `steps`, its
learning rates and seed the first config's. Layers (gates over whole blocks) are learned by
LayerDropConfig(score="l0") (techniques/layer_drop.py), in a stage of its own, with the same gates.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError
from .configs import SparsityConfig, register_technique
from .structured import UNITS, UPDATES, StructuredTechnique


@dataclass(frozen=True)
class L0Config(SparsityConfig):
    """Remove a `target` share of each module's units (MLP channels, attention heads) chosen by
    hard-concrete gates trained `steps` steps on the calibration batches toward that size."""

    TARGET = "MLP or q/k/v/o attention"  # the modules StructuredConfig targets
    SHARE = "target"  # the field holding the share removed, for structured.py's errors
    target: float = 0.5
    steps: int = 200
    lr: float = 0.1          # Adam on the gates' log_alpha
    lambda_lr: float = 0.5   # Adam ascent on the Lagrange multipliers
    init_keep: float = 0.95  # each gate's starting P(z != 0): nearly the dense model
    warmup: float = 0.5      # the share of the steps over which the target size is annealed from init_keep
    update: str | None = None
    damp: float = 0.01
    unit: str = "head"
    seed: int = 0            # the gates' noise

    #: what StructuredTechnique reads (structured.py): the share removed, the score, uniform widths
    score = "l0"
    layerwise = None

    @property
    def sparsity(self) -> float:
        return self.target

    def validate(self) -> None:
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not 0 < self.target < 1:
            raise RecipeError(f"L0Config.target is the share of units removed, in (0, 1); got {self.target!r} "
                              "(0.5 removes half of each module's channels or heads)")
        check_gate_fields(self)
        if self.update not in UPDATES:
            raise RecipeError(f"L0Config.update must be None or 'refit', got {self.update!r}")
        if not 0 <= self.damp < 1:
            raise RecipeError(f"L0Config.damp must be in [0, 1), got {self.damp!r}")
        if self.unit not in UNITS:
            raise RecipeError(f"L0Config.unit must be one of {UNITS}, got {self.unit!r}")


def check_gate_fields(config) -> None:
    """The hard-concrete gate-training fields shared by L0Config and LayerDropConfig(score="l0"):
    steps, lr, lambda_lr, init_keep, warmup, seed; one-line RecipeErrors naming the field."""
    who = type(config).__name__
    if isinstance(config.steps, bool) or not isinstance(config.steps, int) or config.steps < 1:
        raise RecipeError(f"{who}.steps is the number of gate-training steps, an integer >= 1; got "
                          f"{config.steps!r} (e.g. steps={type(config).steps})")
    for name in ("lr", "lambda_lr"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise RecipeError(f"{who}.{name} must be a positive number, got {value!r} (e.g. {name}="
                              f"{getattr(type(config), name)})")
    if isinstance(config.init_keep, bool) or not isinstance(config.init_keep, (int, float)) or \
            not 0 < config.init_keep < 1:
        raise RecipeError(f"{who}.init_keep is each gate's starting probability of being open, in (0, 1); "
                          f"got {config.init_keep!r} (e.g. 0.95)")
    if isinstance(config.warmup, bool) or not isinstance(config.warmup, (int, float)) or not 0 <= config.warmup <= 1:
        raise RecipeError(f"{who}.warmup is the share of the steps over which the target size is approached, "
                          f"in [0, 1]; got {config.warmup!r} (e.g. 0.5)")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise RecipeError(f"{who}.seed must be an integer >= 0, got {config.seed!r} (e.g. seed=0)")


@register_technique(L0Config)
class L0Technique(StructuredTechnique):
    """StructuredConfig's removal (check, plan, apply, restore: structured.py) with the learned gates
    as the score."""

    def needs(self, config):
        return ("unit_gates",) + (("channel_stats",) if config.update == "refit" else ())

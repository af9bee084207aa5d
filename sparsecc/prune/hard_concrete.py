"""Hard-concrete gates for L0 regularisation (Louizos, Welling & Kingma 2018, "Learning Sparse
Neural Networks through L0 Regularization"; as Sheared-LLaMA, Xia et al. 2024, uses them to learn
which heads and channels to remove). Pure functions of tensors.

A gate z in [0, 1] per unit, parameterised by log_alpha, drawn with the reparameterisation trick:

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    s̄ = s (zeta - gamma) + gamma,  z = clamp(s̄, 0, 1)

so P(z = 0) > 0 and P(z = 1) > 0 and z is differentiable in log_alpha. The expected number of
non-zero gates (the L0 "norm" the constraint counts) has a closed form:

    P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))

At test time the gate is deterministic: clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1).
Sheared-LLaMA's constraint toward a target size T (E the expected size):

    loss + lambda1 (E - T) + lambda2 (E - T)²,  lambda1 and lambda2 maximised (gradient ascent).
"""
from __future__ import annotations

import math

import torch

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
#: numerical margin keeping u away from 0 and 1 (log of both ends finite)
EPS = 1e-6


def sample_gates(log_alpha: torch.Tensor, u: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                 beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """z ~ HardConcrete(log_alpha, beta), shape of log_alpha, differentiable in log_alpha. `u`: the
    uniform noise (drawn with `generator`, on the CPU, when not given: the same draws on every device)."""
    if u is None:
        u = torch.rand(log_alpha.shape, generator=generator, dtype=torch.float32).to(log_alpha.device)
    u = u.to(log_alpha.dtype).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """The test-time gate: clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """P(z != 0) of each gate: sigmoid(log_alpha - beta log(-gamma / zeta)); its sum is the expected
    number of units kept."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def log_alpha_for(keep: float, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> float:
    """The log_alpha whose P(z != 0) is `keep` (in (0, 1)): the inverse of `expected_l0`."""
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1), got {keep!r}")
    return math.log(keep) - math.log1p(-keep) + beta * math.log(-gamma / zeta)


def lagrangian(expected: torch.Tensor, target: float | torch.Tensor, lambda1: torch.Tensor,
               lambda2: torch.Tensor) -> torch.Tensor:
    """lambda1 (E - T) + lambda2 (E - T)²: minimised in the gates, maximised in lambda1, lambda2
    (the caller ascends their gradient, e.g. by negating it), which drives E to T."""
    gap = expected - target
    return lambda1 * gap + lambda2 * gap * gap

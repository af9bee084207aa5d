"""Hard-concrete gates (prune/hard_concrete.py): the closed-form expected L0 against a Monte Carlo
estimate, the gate's range and point masses, the deterministic gate, gradients, and the Lagrangian
driving an expected size to its target."""
import math

import pytest
import torch

from sparsecc.prune.hard_concrete import (
    BETA,
    GAMMA,
    ZETA,
    deterministic_gates,
    expected_l0,
    lagrangian,
    log_alpha_for,
    sample_gates,
)

LOG_ALPHA = torch.tensor([-4.0, -1.5, 0.0, 1.0, 3.0])


def test_expected_l0_matches_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    z = sample_gates(LOG_ALPHA.expand(200_000, -1).contiguous(), generator=g)
    nonzero = (z > 0).double().mean(0)
    torch.testing.assert_close(nonzero, expected_l0(LOG_ALPHA).double(), rtol=0, atol=4e-3)
    # the closed form, by hand: sigmoid(log_alpha - beta log(-gamma / zeta))
    torch.testing.assert_close(expected_l0(torch.tensor(0.0)),
                               torch.tensor(1 / (1 + math.exp(BETA * math.log(-GAMMA / ZETA)))))


def test_gates_lie_in_0_1_with_mass_at_both_ends():
    z = sample_gates(torch.zeros(50_000), generator=torch.Generator().manual_seed(1))
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0
    assert 0.05 < float((z == 0).double().mean()) < 0.5 and 0.05 < float((z == 1).double().mean()) < 0.5
    assert float(((z > 0) & (z < 1)).double().mean()) > 0.3  # and a continuous part between


def test_sampling_is_deterministic_given_the_noise_and_differentiable():
    la = LOG_ALPHA.clone().requires_grad_(True)
    a = sample_gates(la, generator=torch.Generator().manual_seed(3))
    b = sample_gates(la, generator=torch.Generator().manual_seed(3))
    u = torch.rand(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a, sample_gates(la, u))
    a.sum().backward()
    inside = (a > 0) & (a < 1)
    assert bool((la.grad[inside] > 0).all()) and bool((la.grad[~inside] == 0).all())


def test_deterministic_gate():
    la = torch.linspace(-8, 8, 33)
    z = deterministic_gates(la)
    torch.testing.assert_close(z, (torch.sigmoid(la) * (ZETA - GAMMA) + GAMMA).clamp(0, 1))
    assert float(z[0]) == 0.0 and float(z[-1]) == 1.0 and bool((z[1:] >= z[:-1]).all())
    assert float(deterministic_gates(torch.tensor(0.0))) == pytest.approx(0.5)


def test_log_alpha_for_inverts_expected_l0():
    for keep in (0.05, 0.5, 0.95):
        assert float(expected_l0(torch.tensor(log_alpha_for(keep)))) == pytest.approx(keep, abs=1e-6)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        log_alpha_for(1.0)


def test_the_lagrangian_drives_the_expected_size_to_the_target():
    """Gates that the 'loss' wants open, held to 30% kept by the multipliers alone (ascended)."""
    g = torch.Generator().manual_seed(0)
    la = torch.full((200,), log_alpha_for(0.95), requires_grad=True)
    lambdas = torch.zeros(2, requires_grad=True)
    value = torch.rand(200, generator=g)  # each open gate lowers the loss by its value
    opt, ascent = torch.optim.Adam([la], lr=0.1), torch.optim.Adam([lambdas], lr=0.5, maximize=True)
    for _ in range(400):
        z = sample_gates(la, generator=g)
        expected = expected_l0(la).mean()
        objective = -(value * z).mean() + lagrangian(expected, 0.3, lambdas[0], lambdas[1])
        opt.zero_grad()
        ascent.zero_grad()
        objective.backward()
        opt.step()
        ascent.step()
    assert float(expected_l0(la.detach()).mean()) == pytest.approx(0.3, abs=0.03)
    top = torch.topk(la.detach(), 60).indices  # the gates kept are the valuable ones
    assert float(value[top].mean()) > 0.75
    # the multipliers' gradient is the gap (lambda1) and its square (lambda2)
    lam = torch.zeros(2, requires_grad=True)
    lagrangian(torch.tensor(0.7), 0.5, lam[0], lam[1]).backward()
    torch.testing.assert_close(lam.grad, torch.tensor([0.2, 0.04]))

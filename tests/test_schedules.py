import math

import pytest
import torch

from mdlm.config import NoiseConfig
from mdlm.diffusion.objective import continuous_nelbo_weight, reverse_unmask_prob
from mdlm.diffusion.schedules import SCHEDULES, get_schedule

NAMES = sorted(SCHEDULES)


@pytest.mark.parametrize("name", NAMES)
def test_endpoints_and_monotone(name):
    s = get_schedule(name)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha = s.alpha(t)
    assert alpha[0].item() == pytest.approx(1.0, abs=1e-12)
    assert alpha[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert (alpha[1:] <= alpha[:-1] + 1e-15).all()
    assert (s.alpha_prime(t[1:-1]) < 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_derivative_matches_finite_difference(name):
    s = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    numeric = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(s.alpha_prime(t), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_mask_prob_is_one_minus_alpha_and_accurate_near_zero(name):
    s = get_schedule(name)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(s.mask_prob(t), 1 - s.alpha(t), rtol=0, atol=1e-12)
    # Near t = 0, 1 - alpha_t is tiny; the dedicated formula must keep relative accuracy
    # (it matches the first-order Taylor term -alpha'_0 t).
    tiny = torch.tensor([1e-9], dtype=torch.float64)
    assert s.mask_prob(tiny).item() == pytest.approx(-s.alpha_prime(torch.zeros(1)).item() * 1e-9, rel=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_inverse_mask_prob(name):
    s = get_schedule(name)
    t = torch.linspace(0.001, 0.999, 57, dtype=torch.float64)
    torch.testing.assert_close(s.inverse_mask_prob(s.mask_prob(t)), t, rtol=1e-9, atol=1e-9)


def test_loglinear_weight_is_one_over_t():
    s = get_schedule("loglinear")
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(continuous_nelbo_weight(s, t), 1 / t)


@pytest.mark.parametrize("name", NAMES)
def test_weights_integrate_and_telescope_to_one(name):
    """int_0^1 -alpha'_t dt = alpha_0 - alpha_1 = 1 and sum_i (alpha_s - alpha_t) = 1: the reason a uniform
    denoiser's NELBO is log K for every schedule."""
    s = get_schedule(name)
    n = 200001
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    integral = torch.trapezoid(-s.alpha_prime(t), t).item()
    assert integral == pytest.approx(1.0, abs=1e-6)
    T = 50
    ts = torch.arange(1, T + 1, dtype=torch.float64) / T
    telescoped = (reverse_unmask_prob(s, ts - 1 / T, ts) * s.mask_prob(ts)).sum().item()
    assert telescoped == pytest.approx(1.0, abs=1e-12)


def test_sigma_parameters_are_used():
    a = get_schedule(NoiseConfig(schedule="geometric", sigma_min=1e-3, sigma_max=5.0))
    b = get_schedule(NoiseConfig(schedule="geometric"))
    t = torch.tensor([0.5], dtype=torch.float64)
    assert a.alpha(t).item() != pytest.approx(b.alpha(t).item())
    lin = get_schedule(NoiseConfig(schedule="linear", sigma_max=10.0))
    # alpha_t = (exp(-10 t) - exp(-10)) / (1 - exp(-10))
    expected = (math.exp(-5.0) - math.exp(-10.0)) / (1 - math.exp(-10.0))
    assert lin.alpha(t).item() == pytest.approx(expected, rel=1e-12)

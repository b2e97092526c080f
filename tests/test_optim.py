"""AdamW construction and the learning-rate multiplier (linear warm-up, then constant or cosine)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from mdlm.config import TrainingConfig
from mdlm.train.optim import build_optimizer, build_scheduler, lr_multiplier


def test_linear_warmup_then_constant():
    config = TrainingConfig(warmup_steps=10, lr_schedule="constant", max_steps=100)
    for step in range(10):
        assert lr_multiplier(step, config) == pytest.approx((step + 1) / 10), step
    assert lr_multiplier(0, config) == pytest.approx(0.1)
    assert lr_multiplier(9, config) == pytest.approx(1.0)
    for step in (10, 11, 50, 100, 10_000):
        assert lr_multiplier(step, config) == 1.0, step


def test_no_warmup_is_constant_from_step_zero():
    config = TrainingConfig(warmup_steps=0, lr_schedule="constant")
    assert [lr_multiplier(step, config) for step in range(5)] == [1.0] * 5


def test_paper_defaults_warm_up_over_2500_steps():
    config = TrainingConfig()
    assert lr_multiplier(0, config) == pytest.approx(1 / 2500)
    assert lr_multiplier(1249, config) == pytest.approx(0.5)
    assert lr_multiplier(2500, config) == 1.0
    assert lr_multiplier(9999, config) == 1.0


def test_cosine_decays_from_one_to_min_ratio():
    config = TrainingConfig(warmup_steps=10, max_steps=110, lr_schedule="cosine", min_lr_ratio=0.1)
    for step in range(10):
        assert lr_multiplier(step, config) == pytest.approx((step + 1) / 10)
    assert lr_multiplier(10, config) == pytest.approx(1.0)
    assert lr_multiplier(60, config) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_multiplier(35, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(110, config) == pytest.approx(0.1)
    assert lr_multiplier(500, config) == pytest.approx(0.1)  # stays at the floor after max_steps
    values = [lr_multiplier(step, config) for step in range(10, 120)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # non-increasing after warm-up
    assert min(values) >= 0.1 - 1e-12


def test_cosine_without_warmup_and_zero_floor():
    config = TrainingConfig(warmup_steps=0, max_steps=100, lr_schedule="cosine", min_lr_ratio=0.0)
    assert lr_multiplier(0, config) == pytest.approx(1.0)
    assert lr_multiplier(50, config) == pytest.approx(0.5)
    assert lr_multiplier(100, config) == pytest.approx(0.0, abs=1e-12)


def test_build_optimizer_uses_config_hyperparameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    config = TrainingConfig(lr=2e-4, beta1=0.8, beta2=0.95, adam_eps=1e-6, weight_decay=0.01)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["lr"] == 2e-4
    assert group["betas"] == (0.8, 0.95)
    assert group["eps"] == 1e-6
    assert group["weight_decay"] == 0.01
    params = group["params"]
    assert len(params) == 3  # the frozen bias is left out
    assert all(p.requires_grad for p in params)
    assert not any(p is model[1].bias for p in params)


def test_one_step_matches_the_adamw_update_in_closed_form():
    """theta <- theta (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), m_hat = g, v_hat = g^2 after one step."""
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainingConfig(lr=1e-2, beta1=0.9, beta2=0.99, adam_eps=1e-8, weight_decay=0.1)
    optimizer = build_optimizer(model, config)
    assert optimizer.defaults["fused"]  # one kernel for all parameters on CPU
    model(torch.randn(5, 3)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        expected = p0 * (1 - 1e-2 * 0.1) - 1e-2 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_scheduler_applies_multiplier_to_lr():
    model = nn.Linear(2, 2)
    config = TrainingConfig(lr=1e-3, warmup_steps=4, max_steps=12, lr_schedule="cosine", min_lr_ratio=0.2)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    for step in range(15):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_multiplier(step, config)), step
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.2)

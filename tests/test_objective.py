"""The NELBO against closed forms: a uniform denoiser gives log K, the exact marginals of an i.i.d. source
give its entropy, for every schedule, in continuous and discrete time."""

import math

import pytest
import torch

from mdlm.config import NoiseConfig
from mdlm.diffusion.objective import (
    antithetic_uniform,
    continuous_times,
    diffusion_nelbo,
    discrete_times,
    forward_mask,
    next_token_nll,
    subs_log_probs,
    subs_masked_nll,
)
from mdlm.diffusion.schedules import SCHEDULES, get_schedule
from mdlm.modeling import MDLM, ARModel

V = 17  # 16 real tokens + [MASK]
MASK = V - 1
K = V - 1


def uniform_denoiser(z, t):
    return torch.zeros(*z.shape, V)


def mc_estimate(noise: NoiseConfig, denoiser, sample_x, batches=24, batch=512, seed=0):
    """Mean and standard error of the per-token NELBO over independent batches."""
    schedule = get_schedule(noise)
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(batches):
        x = sample_x(batch, g)
        values.append(diffusion_nelbo(denoiser, x, schedule, noise, MASK, generator=g).loss.item())
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std() / math.sqrt(len(values))).item()


def expected_factor(noise: NoiseConfig) -> float:
    """E_t[-alpha'_t] under t ~ U[eps, 1]: (alpha_eps - alpha_1) / (1 - eps); 1 in discrete time."""
    if noise.time == "discrete":
        return 1.0
    s = get_schedule(noise)
    eps = noise.sampling_eps
    one = torch.tensor(1.0, dtype=torch.float64)
    return (s.alpha(one * eps).item() - s.alpha(one).item()) / (1 - eps)


@pytest.mark.parametrize("time", ["continuous", "discrete"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_uniform_denoiser_gives_log_k(schedule, time):
    noise = NoiseConfig(schedule=schedule, time=time, num_timesteps=100)
    mean, se = mc_estimate(noise, uniform_denoiser, lambda b, g: torch.randint(0, K, (b, 32), generator=g))
    factor = expected_factor(noise)
    assert abs(factor - 1) < 0.011  # only the [0, sampling_eps] truncation separates it from 1
    assert se < 0.02 * math.log(K), "Monte-Carlo error too large for the test to mean anything"
    assert abs(mean - factor * math.log(K)) < 4 * se + 1e-9, (mean, factor * math.log(K), se)


def test_loglinear_continuous_is_exactly_log_k_in_expectation():
    noise = NoiseConfig()
    assert expected_factor(noise) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("time", ["continuous", "discrete"])
@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_exact_iid_marginals_give_entropy(schedule, time):
    pi = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01] + [0.0] * 6)
    entropy = -(pi[pi > 0] * pi[pi > 0].log()).sum().item()
    logits = torch.cat([pi.clamp_min(1e-30).log(), torch.zeros(1)])

    def marginal_denoiser(z, t):
        return logits.expand(*z.shape, V)

    noise = NoiseConfig(schedule=schedule, time=time, num_timesteps=50)
    mean, se = mc_estimate(noise, marginal_denoiser,
                           lambda b, g: torch.multinomial(pi, b * 32, replacement=True, generator=g).view(b, 32))
    expected = expected_factor(noise) * entropy
    assert se < 0.03 * entropy
    assert abs(mean - expected) < 4 * se, (mean, expected, se)


def test_subs_never_puts_mass_on_mask_and_carries_over():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, V, generator=g) * 3
    logits[..., MASK] = 50.0  # the network would love to predict [MASK]
    z = torch.randint(0, K, (3, 8), generator=g)
    z[:, ::2] = MASK
    logp = subs_log_probs(logits, z, MASK)
    assert torch.isneginf(logp[..., MASK]).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 8))
    unmasked = z != MASK
    assert (logp[unmasked].argmax(-1) == z[unmasked]).all()
    assert (logp[unmasked].max(-1).values == 0).all()


def test_fused_masked_nll_equals_subs_distribution():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 10, V, generator=g)
    x = torch.randint(0, K, (4, 10), generator=g)
    z = torch.where(torch.rand(4, 10, generator=g) < 0.5, torch.full_like(x, MASK), x)
    nll = subs_masked_nll(logits, x, z, MASK)
    reference = -subs_log_probs(logits, z, MASK).gather(-1, x[..., None]).squeeze(-1)
    torch.testing.assert_close(nll, reference)  # carry-over makes unmasked positions exact (0)


def test_loss_ignores_unmasked_positions_and_padding():
    noise = NoiseConfig()
    schedule = get_schedule(noise)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, K, (64, 12), generator=g)
    attention = torch.ones_like(x)
    attention[:, 8:] = 0
    base = torch.randn(64, 12, V, generator=g)
    seen = []

    def clean(z, t):
        seen.append(z.clone())
        return base

    def garbage_where_unmasked(z, t):
        noisy = base + 100 * torch.randn(base.shape, generator=torch.Generator().manual_seed(9))
        return torch.where((z == MASK)[..., None], base, noisy)

    a = diffusion_nelbo(clean, x, schedule, noise, MASK, attention_mask=attention,
                        generator=torch.Generator().manual_seed(3))
    b = diffusion_nelbo(garbage_where_unmasked, x, schedule, noise, MASK, attention_mask=attention,
                        generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.nll_sum, b.nll_sum)
    assert a.num_tokens.item() == 64 * 8
    assert not (seen[0][:, 8:] == MASK).any(), "padding must never be masked"
    assert (seen[0][:, :8] == MASK).any()


def test_forward_mask_rate_matches_schedule():
    s = get_schedule("cosine")
    x = torch.zeros(4, 20000, dtype=torch.long)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
    z = forward_mask(x, t, s, MASK, generator=torch.Generator().manual_seed(0))
    rate = (z == MASK).double().mean(-1)
    torch.testing.assert_close(rate, s.mask_prob(t), atol=0.015, rtol=0)
    assert rate[-1].item() == 1.0


def test_antithetic_times_are_evenly_spread():
    u = antithetic_uniform(8, generator=torch.Generator().manual_seed(0))
    gaps = torch.diff(torch.sort(u).values)
    torch.testing.assert_close(gaps, torch.full((7,), 1 / 8, dtype=torch.float64))
    assert ((u >= 0) & (u < 1)).all()
    t = continuous_times(u, 1e-3)
    assert ((t >= 1e-3) & (t <= 1)).all()


def test_discrete_times_grid():
    u = torch.tensor([0.0, 0.0999, 0.1, 0.55, 0.99999], dtype=torch.float64)
    s, t = discrete_times(u, 10)
    torch.testing.assert_close(t, torch.tensor([0.1, 0.1, 0.2, 0.6, 1.0], dtype=torch.float64))
    torch.testing.assert_close(t - s, torch.full((5,), 0.1, dtype=torch.float64))


def test_one_step_discrete_nelbo_is_fully_masked_lm_loss():
    """T = 1: every token is masked and the weight is 1, so the NELBO is the plain masked-LM NLL."""
    noise = NoiseConfig(time="discrete", num_timesteps=1)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 6, V, generator=g)
    x = torch.randint(0, K, (5, 6), generator=g)
    out = diffusion_nelbo(lambda z, t: logits, x, get_schedule(noise), noise, MASK, generator=g)
    z = torch.full_like(x, MASK)
    expected = -subs_log_probs(logits, z, MASK).gather(-1, x[..., None]).mean()
    torch.testing.assert_close(out.loss, expected)


def test_freshly_initialised_mdlm_is_uniform(tiny_config):
    """The zero-initialised output layer makes x_theta uniform over the K real tokens: NELBO = log K."""
    model = MDLM(tiny_config)
    g = torch.Generator().manual_seed(0)
    k = tiny_config.vocab_size - 1
    values = [model.loss(torch.randint(0, k, (256, 16), generator=g), generator=g).loss.item() for _ in range(8)]
    v = torch.tensor(values)
    assert abs(v.mean().item() - math.log(k)) < 4 * v.std().item() / math.sqrt(len(v)) + 1e-6


def test_ar_next_token_nll(tiny_config):
    import dataclasses

    model = ARModel(dataclasses.replace(tiny_config, kind="ar"))
    x = torch.randint(0, 31, (4, 16))
    attention = torch.ones_like(x)
    attention[:, 10:] = 0
    out = model.loss(x, attention)
    assert out.num_tokens.item() == 4 * 9  # positions 1..9 are predicted real tokens
    assert out.loss.item() == pytest.approx(math.log(tiny_config.vocab_size), abs=1e-5)  # zero-init: uniform
    logits = torch.randn(2, 5, 7)
    y = torch.randint(0, 7, (2, 5))
    manual = -torch.log_softmax(logits[:, :-1], -1).gather(-1, y[:, 1:, None]).mean()
    torch.testing.assert_close(next_token_nll(logits, y).loss, manual)

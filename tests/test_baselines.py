"""The paper's baselines against closed forms: SEDD absorbing (score entropy, analytic and Euler steps) and D3PM
absorbing (the T-step ELBO without SUBS), on the toy language of test_samplers and on i.i.d. sources."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mdlm.config import ConfigError, NoiseConfig, TrainingConfig, load_config
from mdlm.diffusion.d3pm import D3PMObjective, d3pm_unmask_prob
from mdlm.diffusion.objective import (
    MaskedDiffusionObjective,
    continuous_nelbo_weight,
    noised_batches,
    reverse_unmask_prob,
    subs_masked_nll,
    zero_masked_nll,
)
from mdlm.diffusion.schedules import get_schedule
from mdlm.diffusion.sedd import analytic_unmask_prob, euler_unmask_prob, log_ratios, score_entropy
from mdlm.modeling import D3PM, MDLM, SEDD, build_model, load_pretrained
from mdlm.sampling.samplers import ancestral_sample
from mdlm.train.local import evaluate, train_local
from tests.test_model import _tiny_corpus
from tests.test_samplers import LENGTH, MASK, P_JOINT, SEQS, TOKENS, assert_matches_joint, exact_denoiser

V = TOKENS + 1
ENTROPY = float(-(P_JOINT * P_JOINT.log()).sum())  # the toy language's entropy, nats per sequence


def exact_backbone(z, t=None, attention_mask=None):
    """Logits whose softmax over the real tokens is the toy language's exact p(x_l | unmasked tokens of z); the
    [MASK] column is -inf (no mass on it), and log K is added so that SEDD's o = logits - log K is log p."""
    return exact_denoiser(z, t) + math.log(TOKENS)


def mixed_backbone(z, t=None, attention_mask=None):
    """A worse denoiser: 0.6 exact + 0.4 uniform over the real tokens."""
    probs = 0.6 * exact_denoiser(z, t).exp() + 0.4 / TOKENS
    probs[..., MASK] = 0.0
    return probs.log() + math.log(TOKENS)


def mean_bound(objective, backbone, mc_samples=3000, seed=0):
    """sum_x P(x) E[bound(x)] over the 27 sequences of the toy language, with its standard error."""
    out = objective.sequence_nll(backbone, SEQS, mc_samples=mc_samples, generator=torch.Generator().manual_seed(seed))
    per_sequence = out.nll.double().mean(dim=1)
    se = (out.nll.double().var(dim=1) / mc_samples).sqrt()
    return float((P_JOINT * per_sequence).sum()), float((P_JOINT**2 * se**2).sum().sqrt())


def sedd_objective(schedule="loglinear"):
    noise = NoiseConfig(schedule=schedule)
    return MaskedDiffusionObjective(get_schedule(noise), noise, MASK, masked_nll=score_entropy)


# ---------------------------------------------------------------------------------------------------------
# SEDD: score entropy


def test_score_entropy_closed_form_and_its_relation_to_the_masked_nll():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, V, generator=g) * 2
    x = torch.randint(0, TOKENS, (4, 6), generator=g)
    z = torch.where(torch.rand(4, 6, generator=g) < 0.5, torch.full_like(x, MASK), x)
    o = logits - math.log(TOKENS)
    o[..., MASK] = float("-inf")
    manual = o.exp().sum(-1) - o.gather(-1, x[..., None]).squeeze(-1) - 1
    got = score_entropy(logits, x, z, MASK)
    torch.testing.assert_close(got, torch.where(z == MASK, manual, torch.zeros_like(manual)))
    # sum exp(o) - 1 >= log sum exp(o): never below MDLM's masked NLL, equal once the scores normalise
    assert (got >= subs_masked_nll(logits, x, z, MASK) - 1e-6).all()
    normalised = torch.log_softmax(logits.index_fill(-1, torch.tensor([MASK]), float("-inf")), -1) + math.log(TOKENS)
    torch.testing.assert_close(score_entropy(normalised, x, z, MASK), subs_masked_nll(normalised, x, z, MASK))


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_exact_ratios_of_an_iid_source_give_its_entropy(scale):
    """Scores c r_t p0(y) of an i.i.d. source: per-token bound H(p0) + (c - log c - 1), minimal at c = 1."""
    p0 = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    k = len(p0)
    mask = k
    entropy = float(-(p0 * p0.log()).sum())
    logits_row = torch.cat([(p0 * scale).log() + math.log(k), torch.zeros(1, dtype=torch.float64)]).float()
    noise = NoiseConfig()
    objective = MaskedDiffusionObjective(get_schedule(noise), noise, mask, masked_nll=score_entropy)
    g = torch.Generator().manual_seed(1)
    values = []
    for _ in range(16):
        x = torch.multinomial(p0, 512 * 32, replacement=True, generator=g).view(512, 32)
        values.append(objective.loss(lambda z, t, m: logits_row.expand(*z.shape, -1), x, generator=g).loss.item())
    v = torch.tensor(values, dtype=torch.float64)
    expected = entropy + (scale - math.log(scale) - 1)
    assert abs(v.mean().item() - expected) < 4 * v.std().item() / 4 + 0.012, (v.mean().item(), expected)


def test_freshly_initialised_sedd_scores_log_k(tiny_config):
    model = SEDD(dataclasses.replace(tiny_config, kind="sedd"))
    g = torch.Generator().manual_seed(0)
    k = tiny_config.vocab_size - 1
    values = [model.loss(torch.randint(0, k, (256, 16), generator=g), generator=g).loss.item() for _ in range(8)]
    v = torch.tensor(values)
    assert abs(v.mean().item() - math.log(k)) < 4 * v.std().item() / math.sqrt(len(v)) + 1e-6


def test_sedd_bound_is_tight_for_the_exact_scores_and_above_the_nll_otherwise():
    """With the toy language's exact scores the bound equals its entropy (the continuous-time bound of the exact
    reverse process has no gap); a worse denoiser scores above it, and SEDD's bound is at least MDLM's."""
    exact, se = mean_bound(sedd_objective(), exact_backbone)
    assert abs(exact - ENTROPY) < 4 * se + 0.01, (exact, ENTROPY, se)
    worse, se_worse = mean_bound(sedd_objective(), mixed_backbone)
    noise = NoiseConfig()
    mdlm_worse, _ = mean_bound(MaskedDiffusionObjective(get_schedule(noise), noise, MASK), mixed_backbone)
    assert worse > ENTROPY + 0.05 and worse > mdlm_worse - 4 * se_worse


def test_mdlm_bound_is_tight_for_the_exact_denoiser():
    noise = NoiseConfig()
    exact, se = mean_bound(MaskedDiffusionObjective(get_schedule(noise), noise, MASK), exact_backbone)
    assert abs(exact - ENTROPY) < 4 * se + 0.01, (exact, ENTROPY, se)


# ---------------------------------------------------------------------------------------------------------
# SEDD: reverse steps


def test_sedd_unmask_probabilities():
    schedule = get_schedule("cosine")
    s, t = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    p = reverse_unmask_prob(schedule, s, t)
    log_mass = torch.tensor([0.0, math.log(2.0), math.log(0.5)])
    analytic = analytic_unmask_prob(schedule, s, t, log_mass)
    torch.testing.assert_close(analytic, p * log_mass.double().exp() / (1 - p + p * log_mass.double().exp()))
    assert analytic[0].item() == pytest.approx(p.item())  # normalised scores: MDLM's exact step
    w = -schedule.alpha_prime(t) / schedule.mask_prob(t)
    torch.testing.assert_close(euler_unmask_prob(schedule, s, t, log_mass),
                               ((t - s) * w * log_mass.double().exp()).clamp(max=1))
    assert (euler_unmask_prob(schedule, torch.tensor(0.0, dtype=torch.float64), t, log_mass) == 1).all()
    # loglinear: the Euler step of normalised scores is the exact one, (t - s) / t
    ll = get_schedule("loglinear")
    torch.testing.assert_close(euler_unmask_prob(ll, s, t, log_mass[:1]), reverse_unmask_prob(ll, s, t)[None])


def _sedd_weights(z, t):
    return log_ratios(exact_backbone(z, t), MASK)


@pytest.mark.parametrize("rule, steps", [(analytic_unmask_prob, 200), (euler_unmask_prob, 400)])
def test_sedd_steps_with_exact_scores_sample_the_joint(rule, steps):
    n = 10000
    schedule = get_schedule("cosine")
    out = ancestral_sample(_sedd_weights, torch.full((n, LENGTH), MASK), schedule, MASK, steps=steps, cache=True,
                           generator=torch.Generator().manual_seed(4),
                           unmask_rule=lambda s, t, m: rule(schedule, s, t, m))
    assert not (out.tokens == MASK).any()
    assert_matches_joint(out.tokens, n)


# ---------------------------------------------------------------------------------------------------------
# D3PM: the T-step ELBO


def d3pm_objective(steps, aux=0.0):
    noise = NoiseConfig(time="discrete", num_timesteps=steps, aux_ce_weight=aux)
    return D3PMObjective(get_schedule(noise), noise, MASK)


def test_one_step_d3pm_elbo_is_the_cross_entropy_over_the_whole_vocabulary():
    """T = 1: everything is masked and the only step is the reconstruction, -log x~(x0) with x~ a softmax over
    all V columns ([MASK] included: no zero-masking)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, LENGTH, V, generator=g)
    x = torch.randint(0, TOKENS, (5, LENGTH), generator=g)
    out = d3pm_objective(1).sequence_nll(lambda z, t, m: logits, x, generator=g)
    manual = -torch.log_softmax(logits, -1).gather(-1, x[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.nll[:, 0], manual)
    # the exact marginals of the toy language: sum_l -log p_l(x_l), the product of marginals
    exact = d3pm_objective(1).sequence_nll(exact_backbone, SEQS).nll[:, 0].double()
    marginals = [torch.stack([P_JOINT[SEQS[:, position] == v].sum() for v in range(TOKENS)])
                 for position in range(LENGTH)]
    expected = -sum(marginals[position][SEQS[:, position]].log() for position in range(LENGTH))
    torch.testing.assert_close(exact, expected, atol=1e-5, rtol=0)
    assert float((P_JOINT * exact).sum()) > ENTROPY + 0.05  # one step cannot capture the dependence


def test_d3pm_kl_with_mass_on_mask_matches_its_closed_form():
    """An untrained D3PM (uniform over V, [MASK] included): E[bound] per token is
    sum_i (1 - alpha_i) [p_i log V + (1 - p_i) log((1 - p_i) / (1 - p_i + p_i / V))] over the T steps."""
    steps = 8
    noise = NoiseConfig(time="discrete", num_timesteps=steps)
    schedule = get_schedule(noise)
    t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    p = reverse_unmask_prob(schedule, t - 1 / steps, t)
    stay = 1 - p
    kl = p * math.log(V) + torch.where(stay > 0, stay * (stay.clamp_min(1e-30).log() - (stay + p / V).log()), 0)
    expected = float((schedule.mask_prob(t) * kl).sum())
    objective = d3pm_objective(steps)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, TOKENS, (4096, 8), generator=g)
    out = objective.sequence_nll(lambda z, tt, m: torch.zeros(*z.shape, V), x, mc_samples=4, generator=g)
    per_token = out.nll.double().sum(0) / out.num_tokens.double().sum()
    assert abs(per_token.mean().item() - expected) < 4 * per_token.std().item() / 2 + 0.01, (per_token, expected)
    assert expected > math.log(TOKENS)  # mass on [MASK] costs more than MDLM's log K


def test_d3pm_with_no_mass_on_mask_is_mdlms_discrete_nelbo_and_approaches_the_entropy():
    """When x~ puts nothing on [MASK], D3PM's KL is MDLM's T-step term on the same draws; with many steps the
    bound of the exact denoiser approaches the entropy, with few it stays above it."""
    for steps in (2, 1000):
        noise = NoiseConfig(time="discrete", num_timesteps=steps)
        d3pm = d3pm_objective(steps).sequence_nll(exact_backbone, SEQS, mc_samples=8,
                                                  generator=torch.Generator().manual_seed(6))
        mdlm = MaskedDiffusionObjective(get_schedule(noise), noise, MASK).sequence_nll(
            exact_backbone, SEQS, mc_samples=8, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(d3pm.nll, mdlm.nll, atol=1e-4, rtol=1e-5)
    many, se = mean_bound(d3pm_objective(1000), exact_backbone)
    few, _ = mean_bound(d3pm_objective(2), exact_backbone)
    assert abs(many - ENTROPY) < 4 * se + 0.01 and few > ENTROPY + 0.02, (many, few, ENTROPY)


def test_d3pm_auxiliary_loss_is_added_to_the_training_loss_only():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, LENGTH, V, generator=g)
    x = torch.randint(0, TOKENS, (3, LENGTH), generator=g)
    plain = d3pm_objective(10).loss(lambda z, t, m: logits, x, generator=torch.Generator().manual_seed(1))
    aux = d3pm_objective(10, aux=0.5).loss(lambda z, t, m: logits, x, generator=torch.Generator().manual_seed(1))
    ce = -torch.log_softmax(logits, -1).gather(-1, x[..., None]).mean()
    torch.testing.assert_close(aux.nll_sum, plain.nll_sum)
    torch.testing.assert_close(aux.loss, plain.loss + 0.5 * ce)


def test_d3pm_reverse_step():
    schedule = get_schedule("loglinear")
    s, t = torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    log_mass = torch.tensor([0.0, math.log(0.6)])
    expected = torch.tensor([0.5, 0.3], dtype=torch.float64)  # p = (t - s) / t = 0.5, times 1 - x~(m)
    torch.testing.assert_close(d3pm_unmask_prob(schedule, s, t, log_mass), expected)
    assert (d3pm_unmask_prob(schedule, torch.tensor(0.0, dtype=torch.float64), t, log_mass) == 1).all()


# ---------------------------------------------------------------------------------------------------------
# The models


@pytest.mark.parametrize("kind, noise", [("sedd", NoiseConfig()), ("d3pm", NoiseConfig(time="discrete"))])
def test_baseline_models_train_sample_and_round_trip(tiny_config, kind, noise, tmp_path):
    config = dataclasses.replace(tiny_config, kind=kind, bos_token_id=0)
    torch.manual_seed(0)
    model = build_model(config, noise)
    assert type(model) is {"sedd": SEDD, "d3pm": D3PM}[kind] and model.model_type == kind
    rows = _tiny_corpus()
    training = TrainingConfig(max_steps=300, global_batch_size=32, micro_batch_size=32, lr=5e-3, warmup_steps=10,
                              ema_decay=0.0, precision="fp32", log_every=50)
    state = train_local(model, rows, training)
    metrics = evaluate(model, rows, seed=1)
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    assert metrics["nll"] < 0.2 * math.log(31), (kind, metrics)  # memorised: far below log V
    for sampler in model.samplers:
        out = model.sample(3, 16, steps=16, sampler=sampler, seed=0)
        assert out.tokens.shape == (3, 16) and not (out.tokens == model.mask_id).any(), sampler
    model.save_pretrained(tmp_path / kind)
    loaded = load_pretrained(tmp_path / kind)
    assert type(loaded) is type(model) and loaded.noise_config == noise
    x = rows[:4]
    torch.testing.assert_close(loaded.loss(x, generator=torch.Generator().manual_seed(0)).loss,
                               model.eval().loss(x, generator=torch.Generator().manual_seed(0)).loss)


def test_samplers_and_noise_are_checked_per_kind(tiny_config):
    with pytest.raises(ValueError, match="euler"):
        MDLM(tiny_config).sample(1, 8, sampler="euler")
    with pytest.raises(ValueError, match="first_hitting"):
        D3PM(dataclasses.replace(tiny_config, kind="d3pm")).sample(1, 8, sampler="first_hitting")
    with pytest.raises(ConfigError, match=r"noise\.time"):
        load_config("cpu", ["model.kind=d3pm"])
    with pytest.raises(ConfigError, match=r"noise\.time"):
        load_config("cpu", ["model.kind=sedd", "noise.time=discrete"])
    with pytest.raises(ConfigError, match=r"noise\.aux_ce_weight"):
        load_config("cpu", ["noise.aux_ce_weight=0.1"])
    with pytest.raises(ConfigError, match=r"sampling\.sampler"):
        load_config("cpu", ["sampling.sampler=euler"])
    assert load_config("cpu", ["model.kind=d3pm", "noise.time=discrete", "noise.aux_ce_weight=0.01"])
    assert load_config("cpu", ["model.kind=sedd", "sampling.sampler=euler"])


def test_without_carry_over_the_unmasked_positions_are_scored_too():
    """The ablation: on the same draws, the bound gains w(t) * sum over unmasked real positions of
    -log x_theta(x^l), and is never below the SUBS bound."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 8, V, generator=g)
    x = torch.randint(0, TOKENS, (6, 8), generator=g)
    attention = torch.ones_like(x)
    attention[:, 6:] = 0  # padding is never scored
    noise = NoiseConfig()
    schedule = get_schedule(noise)
    subs = MaskedDiffusionObjective(schedule, noise, MASK)
    ablation = MaskedDiffusionObjective(schedule, noise, MASK, masked_nll=zero_masked_nll)
    a = subs.sequence_nll(lambda z, t, m: logits, x, attention, mc_samples=2,
                          generator=torch.Generator().manual_seed(1))
    b = ablation.sequence_nll(lambda z, t, m: logits, x, attention, mc_samples=2,
                              generator=torch.Generator().manual_seed(1))
    samples = noised_batches(x, schedule, noise, MASK, attention_mask=attention, mc_samples=2,
                             generator=torch.Generator().manual_seed(1))
    per_position = zero_masked_nll(logits, x, x, MASK)
    for k, sample in enumerate(samples):
        unmasked = ((sample.z_t != MASK) & attention.bool()).float()
        extra = (per_position * unmasked).sum(-1) * continuous_nelbo_weight(schedule, sample.t).float()
        torch.testing.assert_close(b.nll[:, k], a.nll[:, k] + extra)
    assert (b.nll >= a.nll).all()
    config = load_config("cpu", ["noise.carry_over=false"])
    assert load_config("cpu").noise.carry_over and not config.noise.carry_over
    with pytest.raises(ConfigError, match=r"noise\.carry_over"):
        load_config("cpu", ["noise.carry_over=false", "model.kind=sedd"])

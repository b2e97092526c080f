import itertools
import math

import pytest
import torch

from mdlm.diffusion.schedules import get_schedule
from mdlm.modeling import MDLM
from mdlm.sampling.categorical import sample_categorical, top_p_filter
from mdlm.sampling.samplers import (
    ancestral_sample,
    first_hitting_sample,
    run_sampler,
    semi_autoregressive_sample,
)
from tests.conftest import perturb_

# A toy language: 3 positions over tokens {0, 1, 2}, mask id 3, with a known joint distribution p(x).
TOKENS, LENGTH, MASK = 3, 3, 3
SEQS = torch.tensor(list(itertools.product(range(TOKENS), repeat=LENGTH)))  # [27, 3]
_w = torch.arange(1, len(SEQS) + 1, dtype=torch.float64) ** 2
_w[SEQS[:, 0] == SEQS[:, 2]] *= 6  # strong dependence between the ends
P_JOINT = _w / _w.sum()


def exact_denoiser(z, t):
    """x_theta(z)_l = p(x_l | unmasked tokens of z) under P_JOINT, as SUBS log-probs (the ideal denoiser)."""
    consistent = ((z[:, None, :] == MASK) | (z[:, None, :] == SEQS[None])).all(-1)  # [B, 27]
    w = consistent * P_JOINT[None]
    onehot = torch.nn.functional.one_hot(SEQS, TOKENS + 1).double()  # [27, 3, 4]
    probs = torch.einsum("bj,jlv->blv", w, onehot) / w.sum(-1)[:, None, None]
    return probs.clamp_min(0).log().float()


def joint_frequencies(tokens):
    index = (tokens * torch.tensor([9, 3, 1])).sum(-1)
    return torch.bincount(index, minlength=27).double() / len(tokens)


def assert_matches_joint(tokens, n):
    freq = joint_frequencies(tokens)
    tolerance = 4.5 * torch.sqrt(P_JOINT * (1 - P_JOINT) / n) + 1e-3
    assert ((freq - P_JOINT).abs() < tolerance).all(), (freq - P_JOINT).abs().max()


N = 20000


def test_first_hitting_samples_the_exact_joint():
    z = torch.full((N, LENGTH), MASK)
    out = first_hitting_sample(exact_denoiser, z, get_schedule("cosine"), MASK,
                               generator=torch.Generator().manual_seed(0))
    assert out.num_forward_passes == LENGTH  # one token per pass, whatever the step count
    assert_matches_joint(out.tokens, N)


def test_ancestral_with_many_steps_matches_first_hitting_marginals():
    n = N // 2
    z = torch.full((n, LENGTH), MASK)
    schedule = get_schedule("loglinear")
    anc = ancestral_sample(exact_denoiser, z, schedule, MASK, steps=200, cache=True,
                           generator=torch.Generator().manual_seed(1)).tokens
    fh = first_hitting_sample(exact_denoiser, z, schedule, MASK, generator=torch.Generator().manual_seed(2)).tokens
    assert_matches_joint(anc, n)  # with steps >> length, simultaneous unmasking is rare
    for position in range(LENGTH):
        a = torch.bincount(anc[:, position], minlength=TOKENS).double() / n
        b = torch.bincount(fh[:, position], minlength=TOKENS).double() / n
        # two independent estimates of one marginal: difference < 4.5 standard errors
        assert ((a - b).abs() < 4.5 * torch.sqrt(2 * a * (1 - a) / n) + 1e-3).all()


def test_single_step_ancestral_is_the_product_of_marginals():
    """steps=1 unmasks everything at once from p(x_l | nothing): independent marginals, not the joint."""
    z = torch.full((N, LENGTH), MASK)
    out = ancestral_sample(exact_denoiser, z, get_schedule("loglinear"), MASK, steps=1,
                           generator=torch.Generator().manual_seed(3))
    same_ends = (out.tokens[:, 0] == out.tokens[:, 2]).double().mean().item()
    p_same_joint = P_JOINT[SEQS[:, 0] == SEQS[:, 2]].sum().item()
    marg0 = torch.stack([P_JOINT[SEQS[:, 0] == v].sum() for v in range(3)])
    marg2 = torch.stack([P_JOINT[SEQS[:, 2] == v].sum() for v in range(3)])
    p_same_independent = (marg0 * marg2).sum().item()
    assert abs(same_ends - p_same_independent) < 0.015
    assert abs(same_ends - p_same_joint) > 0.1


@pytest.fixture
def deterministic_model(tiny_config):
    model = perturb_(MDLM(tiny_config), scale=0.3)
    return model.eval()


@pytest.mark.parametrize("steps", [4, 16, 100])
def test_cached_equals_plain_ancestral_under_one_seed(deterministic_model, steps):
    m = deterministic_model
    z = torch.full((6, 16), m.mask_id)
    plain = ancestral_sample(m.denoise, z, m.schedule, m.mask_id, steps=steps,
                             generator=torch.Generator().manual_seed(5))
    cached = ancestral_sample(m.denoise, z, m.schedule, m.mask_id, steps=steps, cache=True,
                              generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain.tokens, cached.tokens)
    assert plain.num_forward_passes == steps
    assert cached.num_forward_passes <= min(steps, 6 * 16)
    one = ancestral_sample(m.denoise, z[:1], m.schedule, m.mask_id, steps=steps, cache=True,
                           generator=torch.Generator().manual_seed(5))
    assert one.num_forward_passes <= min(steps, 16)  # a pass only after a step that changed something
    if steps == 100:
        assert cached.num_forward_passes < plain.num_forward_passes


def test_cache_recomputes_only_the_rows_that_changed(deterministic_model):
    """Batched caching: a row is recomputed only after a step that changed it, so its cost is bounded by its
    own masked tokens (16), not by the number of passes the whole batch needs."""
    m = deterministic_model
    seen: list[int] = []

    def counting_denoise(z, t):
        seen.append(z.shape[0])
        return m.denoise(z, t)

    z = torch.full((6, 16), m.mask_id)
    out = ancestral_sample(counting_denoise, z, m.schedule, m.mask_id, steps=100, cache=True,
                           generator=torch.Generator().manual_seed(5))
    assert out.num_forward_passes == len(seen) > 16  # the batch needs more passes than any one row...
    assert seen[0] == 6 and sum(seen) <= 6 * 16  # ...but each row is computed at most 16 times
    assert min(seen[1:]) < 6


@pytest.mark.parametrize("sampler", ["ancestral", "cached", "first_hitting"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_no_mask_left_and_prefix_kept(deterministic_model, sampler, steps):
    m = deterministic_model
    prefix = torch.tensor([3, 1, 4, 1, 5])
    out = m.sample(4, 16, steps=steps, sampler=sampler, prefix=prefix, seed=0)
    assert out.tokens.shape == (4, 16)
    assert not (out.tokens == m.mask_id).any()
    assert (out.tokens[:, :5] == prefix).all()


@pytest.mark.parametrize("sampler", ["ancestral", "cached", "first_hitting"])
def test_infill_keeps_given_tokens_at_every_step(deterministic_model, sampler):
    m = deterministic_model
    template = torch.full((16,), m.mask_id)
    given = {0: 7, 5: 2, 6: 2, 15: 9}
    for pos, tok in given.items():
        template[pos] = tok
    states = []
    out = m.sample(3, template=template, steps=20, sampler=sampler, seed=1,
                   callback=lambda i, z: states.append(z.clone()))
    assert states, "callback never called"
    for z in [*states, out.tokens]:
        for pos, tok in given.items():
            assert (z[:, pos] == tok).all()
    masked = [int((z == m.mask_id).sum()) for z in states]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0


def test_seed_reproducibility_and_sensitivity(deterministic_model):
    m = deterministic_model
    a = m.sample(4, 16, steps=16, seed=11).tokens
    b = m.sample(4, 16, steps=16, seed=11).tokens
    c = m.sample(4, 16, steps=16, seed=12).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_semi_autoregressive_beyond_block_length(deterministic_model):
    m = deterministic_model  # block length 16
    windows = []

    def recording_denoise(z, t):
        windows.append(z.clone())
        return m.denoise(z, t)

    def block(z):
        return run_sampler("cached", recording_denoise, z, m.schedule, m.mask_id, steps=16,
                           generator=torch.Generator().manual_seed(0))

    prefix = torch.tensor([[1, 2, 3]] * 2)
    out = semi_autoregressive_sample(block, prefix, total_length=40, block_length=16, stride=6, mask_id=m.mask_id)
    assert out.tokens.shape == (2, 40)
    assert not (out.tokens == m.mask_id).any()
    assert (out.tokens[:, :3] == prefix).all()
    assert max(w.shape[1] for w in windows) == 16
    # Every later window starts with the last 10 generated tokens as context.
    first_of_round = [w for w in windows if w.shape[1] <= 16 and (w[:, :10] != m.mask_id).all()
                      and (w[:, 10:] == m.mask_id).all()]
    assert len(first_of_round) == 4  # ceil((40 - 16) / 6) rounds
    for i, w in enumerate(first_of_round):
        start = 16 + 6 * i - 10
        assert torch.equal(w[:, :10], out.tokens[:, start:start + 10])
    via_model = m.sample(2, 40, stride=6, steps=16, prefix=[1, 2, 3], seed=0)
    assert via_model.tokens.shape == (2, 40)


def test_length_beyond_block_needs_stride(deterministic_model):
    with pytest.raises(ValueError, match="stride"):
        deterministic_model.sample(1, 40)


def test_top_p_filter_semantics():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(top_p_filter(probs, 0.81),
                               torch.tensor([[0.5, 0.3, 0.15, 0]], dtype=torch.float64) / 0.95)
    torch.testing.assert_close(top_p_filter(probs, 0.01), torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64))
    assert top_p_filter(probs, 1.0) is probs
    # order-independent
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(top_p_filter(probs[:, perm], 0.7), top_p_filter(probs, 0.7)[:, perm])


def test_tiny_top_p_gives_the_argmax(deterministic_model):
    m = deterministic_model
    out = m.sample(2, 16, steps=1, top_p=1e-6, seed=0)  # one step: every token from x_theta(all masks)
    z = torch.full((1, 16), m.mask_id)
    expected = m.denoise(z, torch.ones(1)).argmax(-1)
    assert (out.tokens == expected).all()


def test_sample_categorical_matches_probabilities():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        draws = sample_categorical(probs.expand(40000, 4), dtype=dtype, generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(draws, minlength=4).double() / 40000
        assert ((freq - probs).abs() < 4.5 * torch.sqrt(probs * (1 - probs) / 40000)).all()


@pytest.mark.slow
def test_float32_gumbel_lowers_entropy_on_a_peaked_distribution():
    """A token 17.5 nats below the best one: float32 uniforms cap the Gumbel noise near 16.6 and suppress
    it (about 5x here); float64 draws it at its true rate (Zheng et al. 2024)."""
    vocab, rows, rounds = 4096, 800, 188  # small chunks: large allocations cost more than the draws
    logp = torch.full((vocab,), -17.5, dtype=torch.float64)
    logp[0] = 0.0
    probs = torch.softmax(logp, 0)
    expected = rows * rounds * (1 - probs[0].item())  # ~15 draws of rare tokens
    counts, entropies = {}, {}
    for dtype in (torch.float64, torch.float32):
        g = torch.Generator().manual_seed(0)
        draws = torch.cat([sample_categorical(probs.expand(rows, vocab), dtype=dtype, generator=g)
                           for _ in range(rounds)])
        counts[dtype] = int((draws != 0).sum())
        freq = torch.bincount(draws, minlength=vocab).double() / len(draws)
        entropies[dtype] = -(freq[freq > 0] * freq[freq > 0].log()).sum().item()
    assert abs(counts[torch.float64] - expected) < 4 * math.sqrt(expected)
    assert counts[torch.float32] * 2.5 < counts[torch.float64], counts
    assert entropies[torch.float32] < entropies[torch.float64]

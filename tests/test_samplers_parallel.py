"""Confidence-based parallel decoding and ReMDM remasking, against hand-computed closed forms on toy
denoisers, and through the model, the service's engine and evaluation's generation."""

import itertools
import math

import pytest
import torch

from mdlm.diffusion.remdm import remask_sigma, remask_sigma_max, remdm_unmask_prob
from mdlm.diffusion.schedules import get_schedule
from mdlm.eval.generation import generate_samples
from mdlm.eval.settings import GenSettings
from mdlm.modeling import MDLM, load_pretrained
from mdlm.sampling.confidence import confidence_sample
from mdlm.sampling.samplers import ancestral_sample, run_sampler
from mdlm.serve.engine import Engine
from mdlm.serve.schemas import GenerateRequest
from mdlm.serve.settings import serve_config_from_dict
from tests.conftest import perturb_
from tests.serve_support import make_model_dir

# A denoiser that ignores its input: position l has the fixed distribution TABLE[l] over 4 real tokens
# (mask id 4). The probability of each position's most likely token (its confidence) is CONF.
MASK = 4
TABLE = torch.tensor([[0.95, 0.03, 0.01, 0.01],
                      [0.50, 0.30, 0.15, 0.05],
                      [0.005, 0.99, 0.003, 0.002],
                      [0.30, 0.25, 0.25, 0.20],
                      [0.02, 0.02, 0.92, 0.04],
                      [0.10, 0.10, 0.20, 0.60]], dtype=torch.float64)
CONF = [0.95, 0.50, 0.99, 0.30, 0.92, 0.60]
L = len(CONF)


def table_denoiser(z, t):
    probs = torch.cat((TABLE, torch.zeros(L, 1, dtype=torch.float64)), dim=1)  # no mass on [MASK] (SUBS)
    return probs.log().float().expand(z.shape[0], -1, -1)


def unmask_order(**kwargs):
    """Sets of positions unmasked at each pass of one all-masked row."""
    states = [torch.full((1, L), MASK)]
    out = confidence_sample(table_denoiser, states[0], get_schedule("loglinear"), MASK,
                            callback=lambda i, z: states.append(z.clone()), **kwargs)
    order = [set(((a == MASK) & (b != MASK))[0].nonzero().flatten().tolist()) for a, b in itertools.pairwise(states)]
    return order, out


def test_threshold_unmasks_every_position_above_it_and_at_least_the_most_confident():
    order, out = unmask_order(threshold=0.9, top_p=1e-9)
    assert order == [{0, 2, 4}, {5}, {1}, {3}]  # 0.95, 0.99, 0.92 > 0.9; then one at a time by confidence
    assert out.num_forward_passes == 4
    assert out.tokens[0].tolist() == [0, 0, 1, 0, 2, 3]  # a tiny top-p draws the argmax (greedy decoding)
    assert unmask_order(threshold=0.0)[0] == [set(range(L))]  # every probability is above 0: one pass
    assert unmask_order(threshold=1.0)[0] == [{2}, {0}, {4}, {5}, {1}, {3}]  # none above 1: one per pass


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"tokens_per_step": 2}, [{0, 2}, {4, 5}, {1, 3}]),
    ({"steps": 3}, [{0, 2}, {4, 5}, {1, 3}]),  # k = ceil(6 / 3) = 2
    ({"steps": 4}, [{0, 2}, {4, 5}, {1, 3}]),  # k = ceil(6 / 4) = 2
    ({"tokens_per_step": 4}, [{0, 2, 4, 5}, {1, 3}]),
    ({"steps": 6}, [{2}, {0}, {4}, {5}, {1}, {3}]),
])
def test_k_per_step_unmasks_the_k_most_confident(kwargs, expected):
    order, out = unmask_order(threshold=None, **kwargs)
    assert order == expected
    assert out.num_forward_passes == len(expected)


def test_chosen_positions_draw_their_tokens_from_x_theta_with_top_p():
    n = 20000
    z = torch.full((n, L), MASK)
    for top_p, position, probs in [(1.0, 1, TABLE[1]), (1.0, 3, TABLE[3]),
                                   (0.7, 1, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64))]:
        out = confidence_sample(table_denoiser, z, get_schedule("loglinear"), MASK, threshold=0.9, top_p=top_p,
                                generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(out.tokens[:, position], minlength=4).double() / n
        assert ((freq - probs).abs() <= 4.5 * torch.sqrt(probs * (1 - probs) / n) + 1e-9).all(), (top_p, freq)


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_the_denoiser_sees_the_time_of_the_rows_masked_fraction(schedule):
    seen = []

    def recording(z, t):
        seen.append(((z == MASK).sum(-1).double() / L, t.double()))
        return table_denoiser(z, t)

    sched = get_schedule(schedule)
    confidence_sample(recording, torch.full((2, L), MASK), sched, MASK, threshold=None, tokens_per_step=2)
    assert len(seen) == 3
    for fraction, t in seen:  # 1, 4/6, 2/6 of the positions masked: 1 - alpha_t equals that fraction
        torch.testing.assert_close(sched.mask_prob(t), fraction, atol=1e-6, rtol=0)
    assert seen[0][1].tolist() == [1.0, 1.0]


def test_finished_rows_are_not_recomputed():
    rows = []

    def recording(z, t):
        rows.append(z.shape[0])
        return table_denoiser(z, t)

    z = torch.full((3, L), MASK)
    z[0] = torch.tensor([0, 0, 1, 0, 2, MASK])  # one masked position left: done after one pass
    out = confidence_sample(recording, z, get_schedule("loglinear"), MASK, threshold=0.9)
    assert rows == [3, 2, 2, 2] and out.num_forward_passes == 4
    assert out.tokens[0, :5].tolist() == [0, 0, 1, 0, 2]


def test_settings_are_checked_with_their_names():
    z = torch.full((1, L), MASK)
    with pytest.raises(ValueError, match="confidence_threshold"):
        confidence_sample(table_denoiser, z, get_schedule("loglinear"), MASK, threshold=1.5)
    with pytest.raises(ValueError, match="tokens_per_step"):
        confidence_sample(table_denoiser, z, get_schedule("loglinear"), MASK, threshold=None, tokens_per_step=0)
    with pytest.raises(ValueError, match="remask_schedule"):
        run_sampler("remdm", table_denoiser, z, get_schedule("loglinear"), MASK, steps=4, remask_schedule="loop")
    with pytest.raises(ValueError, match="remask_eta"):
        run_sampler("remdm", table_denoiser, z, get_schedule("loglinear"), MASK, steps=4, remask_eta=1.5)


# ---------------------------------------------------------------------------------------------------------
# ReMDM


def test_sigma_schedules_closed_forms():
    sched = get_schedule("loglinear")  # alpha_t = 1 - t
    s, t = torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    assert remask_sigma_max(sched, s, t).item() == 0.5  # min(1, (1 - 0.75) / 0.5)
    assert remask_sigma_max(sched, torch.tensor(0.5, dtype=torch.float64),
                            torch.tensor(0.75, dtype=torch.float64)).item() == 1.0  # min(1, 0.5 / 0.25)
    assert remask_sigma_max(sched, s, torch.tensor(1.0, dtype=torch.float64)).item() == 1.0  # alpha_t = 0
    assert remask_sigma_max(sched, torch.tensor(0.0, dtype=torch.float64), t).item() == 0.0  # last step
    assert remask_sigma_max(sched, torch.tensor(0.0, dtype=torch.float64),
                            torch.tensor(1.0, dtype=torch.float64)).item() == 0.0  # one step: 0 / 0 -> 0
    assert remask_sigma(sched, s, t, kind="cap", eta=0.2).item() == 0.2
    assert remask_sigma(sched, s, t, kind="cap", eta=0.9).item() == 0.5
    assert remask_sigma(sched, s, t, kind="rescale", eta=0.5).item() == 0.25
    # (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t): 0.5 at sigma = 0 (MDLM), 0.7 at 0.2, 1 at sigma_max
    for sigma, p in [(0.0, 0.5), (0.2, 0.7), (0.5, 1.0)]:
        assert remdm_unmask_prob(sched, s, t, torch.tensor(sigma, dtype=torch.float64)).item() == pytest.approx(p)


@pytest.fixture
def deterministic_model(tiny_config):
    return perturb_(MDLM(tiny_config), scale=0.3).eval()


@pytest.mark.parametrize("steps", [4, 16, 100])
@pytest.mark.parametrize("kind", ["cap", "rescale"])
def test_remdm_with_sigma_zero_draws_what_ancestral_draws(deterministic_model, steps, kind):
    m = deterministic_model
    template = torch.full((6, 16), m.mask_id)
    template[:, [0, 5, 6, 15]] = torch.tensor([7, 2, 2, 9])
    outs = {}
    for name in ("ancestral", "cached", "remdm"):
        outs[name] = run_sampler(name, m.denoise, template, m.schedule, m.mask_id, steps=steps,
                                 generator=torch.Generator().manual_seed(5), remask_schedule=kind, remask_eta=0.0)
    assert torch.equal(outs["remdm"].tokens, outs["ancestral"].tokens)
    assert torch.equal(outs["remdm"].tokens, outs["cached"].tokens)
    assert outs["remdm"].num_forward_passes == outs["cached"].num_forward_passes
    uncached = ancestral_sample(m.denoise, template, m.schedule, m.mask_id, steps=steps,
                                generator=torch.Generator().manual_seed(5), remask=lambda s, t: 0.0 * s)
    assert torch.equal(uncached.tokens, outs["ancestral"].tokens)
    assert uncached.num_forward_passes == outs["ancestral"].num_forward_passes


def remdm_transition(schedule, kind, eta, steps, step, n=4000):
    """States before and after reverse step ``step`` (from 0) of the remdm sampler on the table denoiser, over
    ``n`` rows of 8 generated positions and one given token (position 2)."""
    template = torch.full((n, L + 3), MASK)
    template[:, 2] = 3

    def denoise(z, t):
        return table_denoiser(z, t)[:, [0, 1, 0, 2, 3, 4, 5, 1, 0]]  # 9 positions, each with a known x_theta

    states = []
    out = run_sampler("remdm", denoise, template, get_schedule(schedule), MASK, steps=steps, remask_schedule=kind,
                      remask_eta=eta, generator=torch.Generator().manual_seed(1),
                      callback=lambda i, z: states.append(z.clone()))
    assert len(states) == steps and not (out.tokens == MASK).any()
    assert (torch.stack(states)[:, :, 2] == 3).all()  # the given token never changes, never remasked
    return (template if step == 0 else states[step - 1]), states[step]


@pytest.mark.parametrize(("schedule", "kind", "eta", "sigma", "p_unmask"), [
    # loglinear, step t = 0.5 -> s = 0.25 (4 steps): alpha_t = 0.5, alpha_s = 0.75, sigma_max = 0.5
    ("loglinear", "cap", 0.2, 0.2, (0.75 - 0.8 * 0.5) / 0.5),
    ("loglinear", "rescale", 0.5, 0.25, (0.75 - 0.75 * 0.5) / 0.5),
    ("loglinear", "cap", 0.9, 0.5, 1.0),  # the cap above sigma_max: sigma_max, every masked position unmasks
    # cosine, alpha = cos(pi t / 2): sigma_max = min(1, (1 - cos(pi / 8)) / cos(pi / 4))
    ("cosine", "rescale", 0.6, 0.6 * (1 - math.cos(math.pi / 8)) / math.cos(math.pi / 4),
     (math.cos(math.pi / 8) - (1 - 0.6 * (1 - math.cos(math.pi / 8)) / math.cos(math.pi / 4))
      * math.cos(math.pi / 4)) / (1 - math.cos(math.pi / 4))),
])
def test_remdm_step_matches_the_posterior(schedule, kind, eta, sigma, p_unmask):
    """One reverse step t -> s of the sampler, over many rows: a generated token is remasked with probability
    sigma_t and kept otherwise; a masked position unmasks with (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t),
    taking a token from x_theta."""
    before, after = remdm_transition(schedule, kind, eta, steps=4, step=2)
    generated = torch.ones_like(before, dtype=torch.bool)
    generated[:, 2] = False
    was_token = generated & (before != MASK)
    was_mask = before == MASK
    remasked = was_token & (after == MASK)
    kept = was_token & (after != MASK)
    assert torch.equal(after[kept], before[kept])  # a token that stays is the same token
    unmasked = was_mask & (after != MASK)
    for observed, count, p in [(remasked.sum(), was_token.sum(), sigma), (unmasked.sum(), was_mask.sum(), p_unmask)]:
        count = int(count)
        assert count > 5000
        rate = int(observed) / count
        assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / count) + 1e-9, (rate, p)
    # the newly unmasked tokens at position 1 (x_theta = TABLE[1]) follow x_theta
    new = after[:, 1][unmasked[:, 1]]
    if p_unmask > 0:
        freq = torch.bincount(new, minlength=4).double() / new.numel()
        assert ((freq - TABLE[1]).abs() <= 4.5 * torch.sqrt(TABLE[1] * (1 - TABLE[1]) / new.numel())).all()


def test_remdm_first_step_unmasks_with_alpha_s():
    """At t = 1 (alpha_t = 0) the posterior unmasks with probability alpha_s whatever sigma_t."""
    before, after = remdm_transition("loglinear", "cap", 0.3, steps=4, step=0, n=2000)
    unmasked = ((before == MASK) & (after != MASK)).sum().item() / (2000 * 8)
    assert abs(unmasked - 0.25) < 4.5 * math.sqrt(0.25 * 0.75 / 16000)


def test_remdm_takes_more_steps_than_tokens_and_keeps_given_tokens(deterministic_model):
    m = deterministic_model
    template = torch.full((16,), m.mask_id)
    given = {0: 7, 5: 2, 6: 2, 15: 9}
    for pos, tok in given.items():
        template[pos] = tok
    states = []
    out = m.sample(3, template=template, steps=80, sampler="remdm", remask_schedule="rescale", remask_eta=0.5,
                   seed=1, callback=lambda i, z: states.append(z.clone()))
    assert len(states) == 80 and not (out.tokens == m.mask_id).any()
    for z in states:
        for pos, tok in given.items():
            assert (z[:, pos] == tok).all()
    masked = [int((z == m.mask_id).sum()) for z in states]
    assert any(b > a for a, b in itertools.pairwise(masked))  # remasking happened
    assert out.num_forward_passes <= 80
    again = m.sample(3, template=template, steps=80, sampler="remdm", remask_schedule="rescale", remask_eta=0.5,
                     seed=1)
    assert torch.equal(again.tokens, out.tokens)


# ---------------------------------------------------------------------------------------------------------
# Through the model, the service and evaluation


@pytest.mark.parametrize("sampler", ["confidence", "confidence_k", "remdm"])
def test_model_keeps_prefix_and_infill_and_is_seeded(deterministic_model, sampler):
    m = deterministic_model
    prefix = torch.tensor([3, 1, 4, 1, 5])
    a = m.sample(4, 16, steps=6, sampler=sampler, prefix=prefix, seed=0)
    assert not (a.tokens == m.mask_id).any() and (a.tokens[:, :5] == prefix).all()
    assert torch.equal(a.tokens, m.sample(4, 16, steps=6, sampler=sampler, prefix=prefix, seed=0).tokens)
    assert not torch.equal(a.tokens, m.sample(4, 16, steps=6, sampler=sampler, prefix=prefix, seed=1).tokens)
    if sampler == "confidence_k":
        assert a.num_forward_passes == 6  # ceil(11 / 6) = 2 per pass
    long = m.sample(2, 40, stride=6, steps=8, sampler=sampler, prefix=[1, 2, 3], seed=0)  # semi-autoregressive
    assert long.tokens.shape == (2, 40) and not (long.tokens == m.mask_id).any()


def test_model_passes_the_settings(deterministic_model):
    m = deterministic_model
    one = m.sample(2, 16, sampler="confidence", confidence_threshold=1.0, seed=0)
    assert one.num_forward_passes == 16
    assert m.sample(2, 16, sampler="confidence_k", tokens_per_step=8, seed=0).num_forward_passes == 2
    with pytest.raises(ValueError, match="confidence_threshold"):
        m.sample(1, 16, sampler="confidence", confidence_threshold=-0.1)
    from mdlm.config import load_config

    config = load_config(None, ["sampling.sampler=confidence_k", "sampling.tokens_per_step=4",
                                "sampling.remask_schedule=rescale"])
    kwargs = m.sampling_kwargs(config.sampling)
    assert kwargs["tokens_per_step"] == 4 and kwargs["remask_schedule"] == "rescale"
    assert m.sample(1, 16, **kwargs).num_forward_passes == 4


@pytest.mark.parametrize("sampler", ["confidence", "confidence_k", "remdm"])
def test_service_engine_and_eval_generation_take_the_new_samplers(tmp_path, sampler):
    path = make_model_dir(tmp_path / "mdlm")
    engine = Engine(load_pretrained(path), serve_config_from_dict({"model": str(path)}))
    assert sampler in engine.info()["samplers"]
    mask = engine.mask_token
    jobs = [engine.plan_generate(GenerateRequest(prompt="To be", length=16, steps=8, sampler=sampler)),
            engine.plan_generate(GenerateRequest(infill=f"The quick {mask}{mask} fox", sampler=sampler))]
    results = engine.run_generate(jobs)
    assert results[0]["sampler"] == sampler and results[0]["samples"][0]["text"].startswith("To be")
    assert results[1]["samples"][0]["text"].startswith("The quick")
    frames = []
    done = engine.stream(engine.plan_generate(GenerateRequest(prompt="To be", length=16, steps=8, sampler=sampler)),
                         frames.append)
    assert frames[-1]["masked"] == 0 and done["type"] == "done"
    gen = GenSettings(num_samples=2, evaluator="unused", sampler=sampler, steps=8, length=16)
    gen.validate()
    tokens, _, passes = generate_samples(engine.model, 2, gen, seed=0)
    assert tokens.shape == (2, 16) and not (tokens == engine.model.mask_id).any() and passes >= 1

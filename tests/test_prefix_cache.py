"""The approximate prefix KV cache of semi-autoregressive windows (mdlm.models.dit.PrefixKV,
mdlm.modeling.prefix_cached_forward): exact whenever the positions after the prefix are unchanged, computes only
those positions, picks the right cache rows for a partial batch, and samples keep their prompt and fill every
position; its effect on quality is measured by bench/bench_quality.py, not assumed."""

from __future__ import annotations

import pytest
import torch

from mdlm.config import load_config, model_config_for
from mdlm.modeling import MDLM, ARModel, prefix_cached_forward
from mdlm.models.dit import PrefixKV
from tests.conftest import perturb_

MASK = 299


@pytest.fixture(scope="module")
def model():
    config = model_config_for("cpu", vocab_size=300, mask_token_id=MASK, max_seq_len=32, dropout=0.0, n_layers=2,
                              hidden_size=32, n_heads=2, cond_dim=16)
    return perturb_(MDLM(config), scale=0.3, seed=5).eval()


def test_cached_passes_equal_the_full_pass_while_the_rest_is_unchanged(model):
    z, t = torch.randint(0, MASK, (3, 32), generator=torch.Generator().manual_seed(0)), torch.rand(3)
    with torch.no_grad():
        full = model.backbone(z, t)
        cache = PrefixKV(20)
        assert torch.equal(model.backbone(z, t, cache=cache), full)  # the filling pass is the plain pass
        assert len(cache.keys) == 2 and cache.keys[0].shape == (3, 2, 20, 16)
        torch.testing.assert_close(model.backbone(z[:, 20:], t, cache=cache), full[:, 20:], rtol=0, atol=1e-5)
        cache.rows = torch.tensor([2, 0])
        torch.testing.assert_close(model.backbone(z[[2, 0], 20:], t[[2, 0]], cache=cache), full[[2, 0], 20:],
                                   rtol=0, atol=1e-5)
        changed = z.clone()
        changed[:, 25:] = MASK  # the later positions change: the cached prefix keys are now stale (approximate)
        cache.rows = None
        stale = model.backbone(changed[:, 20:], t, cache=cache)
        assert not torch.allclose(stale, model.backbone(changed, t)[:, 20:], atol=1e-5)


def test_the_sampler_side_computes_only_the_positions_after_the_prefix(model):
    window = torch.full((2, 32), MASK)
    window[:, :24] = torch.randint(0, MASK, (24,))
    forward = prefix_cached_forward(model.backbone, window, MASK)
    computed: list[int] = []
    hook = model.backbone.embed.register_forward_hook(lambda _m, ids, _o: computed.append(ids[0].shape[1]))
    try:
        with torch.no_grad():
            first = forward(window, torch.ones(2))
            step = window.clone()
            step[0, 30] = 7  # row 0 changed; the cached sampler recomputes it alone
            again = forward(step[:1], torch.full((1,), 0.5))
    finally:
        hook.remove()
    assert computed == [32, 8] and first.shape == (2, 32, 300) and again.shape == (1, 32, 300)
    torch.testing.assert_close(again[:, :24], first[:1, :24])  # the prefix's logits: the first pass's
    assert prefix_cached_forward(model.backbone, torch.full((2, 32), MASK), MASK) is None  # nothing given
    window[1, 3] = MASK  # a leading position masked in one row: the prefix stops there
    assert prefix_cached_forward(model.backbone, window, MASK) is not None


def test_semi_autoregressive_samples_with_the_prefix_cache(model):
    prompt = [5, 6, 7]
    plain = model.sample(2, 80, prefix=prompt, stride=16, steps=16, sampler="cached", seed=0)
    cached = model.sample(2, 80, prefix=prompt, stride=16, steps=16, sampler="cached", seed=0, prefix_cache=True)
    assert cached.tokens.shape == (2, 80) and cached.tokens[:, :3].tolist() == [prompt, prompt]
    assert not bool((cached.tokens == MASK).any())
    agree = (cached.tokens == plain.tokens).float().mean().item()
    assert agree > 0.5  # an approximation of the same sampler, not another one
    with pytest.raises(ValueError, match="forward hook"):
        model.sample(1, 80, stride=16, steps=4, prefix_cache=True, forward=model.backbone)


def test_prefix_cache_errors_and_config(model):
    ar_config = model_config_for("cpu", kind="ar", vocab_size=300, mask_token_id=MASK, max_seq_len=32, dropout=0.0,
                                 n_layers=1, hidden_size=32, n_heads=2, cond_dim=16)
    with pytest.raises(ValueError, match="bidirectional"):
        ARModel(ar_config).backbone(torch.zeros(1, 8, dtype=torch.long), cache=PrefixKV(4))
    with pytest.raises(ValueError, match="does not fit"):
        model.backbone(torch.zeros(1, 4, dtype=torch.long), cache=PrefixKV(4))
    with pytest.raises(ValueError, match=">= 1"):
        PrefixKV(0)
    config = load_config("cpu", ["sampling.prefix_cache=true", "sampling.length=256", "sampling.stride=64"])
    assert model.sampling_kwargs(config.sampling)["prefix_cache"] is True

import dataclasses
import math
import time

import pytest
import torch

from mdlm.config import ConfigError, NoiseConfig, model_config_for
from mdlm.modeling import MDLM, ARModel, build_model
from mdlm.models.dit import DiT, apply_rotary
from mdlm.train.local import evaluate, train_local
from tests.conftest import perturb_


def test_shapes_and_named_sizes(tiny_config):
    model = DiT(tiny_config)
    x = torch.randint(0, 31, (3, 16))
    assert model(x).shape == (3, 16, 32)
    small = DiT(model_config_for("small"))
    blocks = sum(p.numel() for b in small.blocks for p in b.parameters())
    # 12 blocks x (12 d^2 attention + MLP weights, plus adaLN 128 -> 6d and biases) for d = 768
    assert blocks == 12 * (12 * 768**2 + 4 * 768 + 768 + 2 * 768 + 128 * 6 * 768 + 6 * 768)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bidirectional_vs_causal(tiny_config):
    x = torch.randint(0, 31, (2, 16))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 31
    bi = perturb_(DiT(tiny_config)).eval()
    causal = perturb_(DiT(tiny_config, causal=True)).eval()
    with torch.no_grad():
        assert not torch.allclose(bi(x)[:, :12], bi(y)[:, :12])  # earlier positions see later tokens
        torch.testing.assert_close(causal(x)[:, :12], causal(y)[:, :12])  # ... but not when causal
        assert not torch.allclose(causal(x)[:, 12:], causal(y)[:, 12:])


def test_padding_keys_are_hidden(tiny_config):
    model = perturb_(DiT(tiny_config)).eval()
    x = torch.randint(0, 31, (2, 16))
    y = x.clone()
    y[:, 10:] = 0
    mask = torch.ones_like(x)
    mask[:, 10:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(x, attention_mask=mask)[:, :10], model(y, attention_mask=mask)[:, :10])
        assert torch.isfinite(model(x, attention_mask=mask)).all()


def test_time_conditioning_switch(tiny_config):
    x = torch.randint(0, 31, (2, 16))
    t1, t2 = torch.full((2,), 0.1), torch.full((2,), 0.9)
    off = perturb_(DiT(tiny_config)).eval()
    on = perturb_(DiT(dataclasses.replace(tiny_config, time_conditioning=True))).eval()
    with torch.no_grad():
        torch.testing.assert_close(off(x, t1), off(x, t2))  # the paper's default ignores t
        assert not torch.allclose(on(x, t1), on(x, t2))


def test_rotary_preserves_norm_and_encodes_relative_position():
    from mdlm.models.dit import RotaryEmbedding

    rot = RotaryEmbedding(8)
    cos, sin = rot(10, torch.device("cpu"))
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    rq, rk = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    scores = rq[0, 0] @ rk[0, 0].T  # depends only on the offset j - i
    torch.testing.assert_close(torch.diagonal(scores, 2)[:-1], torch.diagonal(scores, 2)[1:], rtol=1e-4, atol=1e-4)


def test_model_class_checks_kind(tiny_config):
    with pytest.raises(ValueError, match="kind"):
        ARModel(tiny_config)
    with pytest.raises(ValueError, match="kind"):
        MDLM(dataclasses.replace(tiny_config, kind="ar"))
    with pytest.raises(ConfigError, match="n_heads"):
        MDLM(dataclasses.replace(tiny_config, n_heads=5))
    assert isinstance(build_model(dataclasses.replace(tiny_config, kind="ar")), ARModel)


def _tiny_corpus(n_distinct=4, length=16, vocab=31, seed=0):
    """``n_distinct`` random sequences, each repeated to fill a 32-row batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_distinct, length), generator=g).repeat(32 // n_distinct, 1)


@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_tiny_model_overfits_tiny_corpus(tiny_config, kind):
    from mdlm.config import TrainingConfig

    config = dataclasses.replace(tiny_config, kind=kind, bos_token_id=0)
    torch.manual_seed(0)
    model = build_model(config, NoiseConfig())
    rows = _tiny_corpus()
    training = TrainingConfig(max_steps=300, global_batch_size=32, micro_batch_size=32, lr=5e-3, warmup_steps=10,
                              ema_decay=0.0, precision="fp32", log_every=50)
    started = time.perf_counter()
    state = train_local(model, rows, training)
    elapsed = time.perf_counter() - started
    log_v = math.log(31)
    first, last = state.history[0]["loss"], state.history[-1]["loss"]
    metrics = evaluate(model, rows, seed=1)
    assert last < first
    # Memorising 4 sequences: the MDLM bound tends to log(4) / 16 = 0.09 nats/token, the AR loss to 0;
    # log V = 3.43 nats is what an untrained model scores.
    assert metrics["nll"] < 0.2 * log_v, (kind, metrics, elapsed)


def test_vocab_padding_changes_nothing_but_the_head_shape(tiny_config):
    """Padding columns of the output layer never reach a softmax: same logits, same loss, same FLOP count."""
    from dataclasses import replace

    from mdlm.train.mfu import matmul_flops_per_token

    plain = perturb_(MDLM(tiny_config), seed=3)
    padded = MDLM(replace(tiny_config, vocab_pad_multiple=64))
    assert padded.backbone.final.linear.out_features == 64 and tiny_config.vocab_size == 32
    state = plain.state_dict()
    with torch.no_grad():
        for name, p in padded.named_parameters():
            if name.startswith("backbone.final.linear"):
                p.zero_()
                p[:tiny_config.vocab_size].copy_(state[name])
                p[tiny_config.vocab_size:].fill_(5.0)  # large values that would matter if they leaked
            else:
                p.copy_(state[name])
    x = torch.randint(0, 31, (3, 16), generator=torch.Generator().manual_seed(0))
    t = torch.rand(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain(x, t), padded(x, t))
    loss = [m.loss(x, generator=torch.Generator().manual_seed(2)).loss for m in (plain, padded)]
    assert torch.equal(loss[0], loss[1])
    assert matmul_flops_per_token(plain, 16) == matmul_flops_per_token(padded, 16)


def test_kv_cache_gives_the_logits_of_the_full_causal_forward(tiny_config):
    """Feeding a sequence in pieces through a KV cache (a prefill, single tokens, and a multi-token chunk after
    cached positions) gives the logits of one full causal forward pass, position by position."""
    model = perturb_(DiT(tiny_config, causal=True), scale=0.3).eval()
    x = torch.randint(0, 31, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        pieces = [model(x[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 7), (7, 11), (11, 16)]]
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(x[:, :1], cache=cache)  # a 17th position
    with pytest.raises(ValueError, match="capacity"):
        small = model.new_cache(4)
        model(x[:, :5], cache=small)
    with pytest.raises(ValueError, match="causal"):
        DiT(tiny_config).new_cache()


@pytest.mark.parametrize(("prefix", "top_p", "dtype"), [(None, 1.0, "float64"), ([3, 1, 4], 0.9, "float64"),
                                                        ([5], 1.0, "float32")])
def test_ar_sampling_with_the_kv_cache_draws_the_uncached_tokens(tiny_config, prefix, top_p, dtype):
    model = perturb_(ARModel(dataclasses.replace(tiny_config, kind="ar", bos_token_id=0)), scale=0.3).eval()
    cached = model.sample(6, 16, prefix=prefix, top_p=top_p, dtype=dtype, seed=7)
    plain = model.sample(6, 16, prefix=prefix, top_p=top_p, dtype=dtype, seed=7, use_cache=False)
    assert torch.equal(cached.tokens, plain.tokens)  # bit for bit
    given = len(prefix) if prefix else 1  # the BOS token
    assert cached.num_forward_passes == plain.num_forward_passes == 16 - given
    assert not torch.equal(cached.tokens, model.sample(6, 16, prefix=prefix, top_p=top_p, dtype=dtype,
                                                       seed=8).tokens)
    assert (cached.tokens != tiny_config.mask_token_id).all()

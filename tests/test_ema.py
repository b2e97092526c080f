"""EMA of model weights: warm-up decay, closed form, swapping in and out, state round trip."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from mdlm.train.ema import EMA


class Tiny(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.randn(2, generator=generator), requires_grad=False)
        _set_params(self, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.frozen


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _set_params(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator))


def test_shadow_starts_as_copy_of_trainable_params():
    model = Tiny()
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"lin.weight", "lin.bias"}  # the frozen parameter is not tracked
    for name, value in ema.shadow.items():
        param = dict(model.named_parameters())[name]
        assert torch.equal(value, param.detach())
        assert value.data_ptr() != param.data_ptr()  # a copy, not a view


@pytest.mark.parametrize("n_updates", [1, 7, 50])
def test_constant_params_leave_shadow_equal_to_params(n_updates):
    model = Tiny()
    ema = EMA(model, decay=0.999)
    for _ in range(n_updates):
        ema.update(model)
    assert ema.num_updates == n_updates
    for name, p in model.named_parameters():
        if name in ema.shadow:
            assert torch.equal(ema.shadow[name], p.detach()), name


def test_warmup_decay_formula():
    model = Tiny()
    for decay in (0.0, 0.5, 0.9, 0.9999):
        ema = EMA(model, decay=decay)
        for n in range(200):
            assert ema.current_decay() == pytest.approx(min(decay, (1 + n) / (10 + n)), rel=0, abs=1e-15), n
            ema.update(model)
    # Early values by hand: 0.1, 2/11, 3/12 ...
    ema = EMA(model, decay=0.9999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.update(model)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.update(model)
    assert ema.current_decay() == pytest.approx(3 / 12)


def test_shadow_matches_hand_computed_ema():
    """A known sequence of parameter values against the EMA recurrence on plain Python floats."""
    rng = random.Random(0)
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.0]]))
    decay = 0.6  # the warm-up cap (1+n)/(10+n) crosses 0.6 at n = 13, so both regimes are covered
    ema = EMA(model, decay=decay)
    expected = [0.5, -1.0, 2.0, 0.0]
    for n in range(40):
        values = [rng.uniform(-3.0, 3.0) for _ in range(4)]
        with torch.no_grad():
            model.weight.copy_(torch.tensor([values]))
        d = min(decay, (1 + n) / (10 + n))
        expected = [d * s + (1 - d) * v for s, v in zip(expected, values, strict=True)]
        ema.update(model)
        got = ema.shadow["weight"][0].tolist()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), n
    # Sanity: the averaged weights are not simply the last values.
    assert ema.shadow["weight"][0].tolist() != pytest.approx(values, abs=1e-3)


def test_decay_zero_tracks_params_exactly():
    model = Tiny()
    ema = EMA(model, decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        _set_params(model, generator)
        ema.update(model)
        assert torch.equal(ema.shadow["lin.weight"], model.lin.weight.detach())


def test_shadow_is_float32_for_low_precision_params():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    with ema.swapped_in(model):
        assert model.weight.dtype == torch.bfloat16
        assert torch.equal(model.weight, ema.shadow["weight"].to(torch.bfloat16))


def _trained_ema(decay: float = 0.5, steps: int = 5) -> tuple[Tiny, EMA]:
    model = Tiny()
    ema = EMA(model, decay=decay)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        _set_params(model, generator)
        ema.update(model)
    return model, ema


def test_swapped_in_uses_shadow_and_restores_exact_weights():
    model, ema = _trained_ema()
    training = _snapshot(model)
    assert not torch.equal(ema.shadow["lin.weight"], training["lin.weight"])
    x = torch.randn(4, 3)
    with ema.swapped_in(model) as swapped:
        assert swapped is model
        assert torch.equal(model.lin.weight, ema.shadow["lin.weight"])
        assert torch.equal(model.lin.bias, ema.shadow["lin.bias"])
        assert torch.equal(model.frozen, training["frozen"])
        expected = x @ ema.shadow["lin.weight"].T + ema.shadow["lin.bias"] + training["frozen"]
        assert torch.allclose(model(x), expected)
    for name, value in _snapshot(model).items():
        assert torch.equal(value, training[name]), name
    # The shadow itself is unchanged by swapping.
    shadow_before = {k: v.clone() for k, v in ema.shadow.items()}
    with ema.swapped_in(model):
        pass
    for name, value in ema.shadow.items():
        assert torch.equal(value, shadow_before[name])


def test_swapped_in_restores_weights_when_block_raises():
    model, ema = _trained_ema()
    training = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in(model):
        assert torch.equal(model.lin.weight, ema.shadow["lin.weight"])
        raise RuntimeError("boom")
    for name, value in _snapshot(model).items():
        assert torch.equal(value, training[name]), name


def test_copy_to_overwrites_params():
    model, ema = _trained_ema()
    ema.copy_to(model)
    assert torch.equal(model.lin.weight, ema.shadow["lin.weight"])


def test_state_dict_round_trip():
    model, ema = _trained_ema(decay=0.7, steps=6)
    state = ema.state_dict()
    assert state["decay"] == 0.7 and state["num_updates"] == 6
    restored = EMA(Tiny(seed=9), decay=0.1)
    assert not torch.equal(restored.shadow["lin.weight"], ema.shadow["lin.weight"])
    restored.load_state_dict(state)
    assert restored.decay == 0.7 and restored.num_updates == 6
    assert restored.current_decay() == ema.current_decay()
    for name, value in ema.shadow.items():
        assert torch.equal(restored.shadow[name], value), name
    # Both continue identically.
    generator = torch.Generator().manual_seed(3)
    _set_params(model, generator)
    ema.update(model)
    restored.update(model)
    for name, value in ema.shadow.items():
        assert torch.equal(restored.shadow[name], value), name


def test_load_state_dict_rejects_mismatched_keys():
    _, ema = _trained_ema()
    other = EMA(nn.Linear(3, 2), decay=0.5)  # keys 'weight', 'bias' instead of 'lin.weight', 'lin.bias'
    with pytest.raises(KeyError, match="mismatch"):
        other.load_state_dict(ema.state_dict())


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1])
def test_invalid_decay_raises(decay):
    with pytest.raises(ValueError, match="decay"):
        EMA(Tiny(), decay=decay)

"""``save_pretrained`` / ``from_pretrained`` / ``load_pretrained``: bit-exact round trips and clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import mdlm
from mdlm.config import ConfigError, NoiseConfig, model_config_for
from mdlm.data.tokenizer import TOKENIZER_FILE, train_bpe
from mdlm.hub import TOKENIZER_NAME, read_model_config
from mdlm.modeling import MDLM, ARModel
from tests.serve_support import SENTENCES


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(SENTENCES, 300)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (adaLN and the output head are zero-initialised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05)


def _mdlm(seed: int = 0, tokenizer=None, **changes) -> MDLM:
    config = model_config_for("cpu", vocab_size=64, mask_token_id=63, max_seq_len=16, **changes)
    noise = NoiseConfig(schedule="cosine", sampling_eps=1e-4, antithetic=False)
    model = MDLM(config, noise=noise, tokenizer=tokenizer)
    _perturb(model, seed)
    return model


def _ar(seed: int = 0) -> ARModel:
    config = model_config_for("cpu", kind="ar", vocab_size=64, mask_token_id=None, bos_token_id=0,
                              max_seq_len=16)
    model = ARModel(config)
    _perturb(model, seed)
    return model


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (3, 16), generator=generator), torch.rand(3, generator=generator)


def test_round_trip_is_bit_exact(tmp_path, tokenizer):
    model = _mdlm(tokenizer=tokenizer, time_conditioning=True)
    model.save_pretrained(tmp_path / "m")
    loaded = MDLM.from_pretrained(tmp_path / "m")
    assert type(loaded) is MDLM
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(restored) == list(original)
    assert len(original) > 10
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    assert loaded.config == model.config
    assert loaded.config.time_conditioning is True
    assert loaded.noise_config == model.noise_config
    assert loaded.noise_config.schedule == "cosine" and loaded.noise_config.antithetic is False
    assert type(loaded.schedule) is type(model.schedule)
    assert loaded.mask_id == 63


def test_tokenizer_round_trips(tmp_path, tokenizer):
    model = _mdlm(tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "m")
    loaded = MDLM.from_pretrained(tmp_path / "m")
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.to_str() == tokenizer.to_str()
    text = "To be or not to be, lend me your ears."
    assert loaded.tokenizer.encode(text).ids == tokenizer.encode(text).ids
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text).ids) == text
    assert loaded.tokenizer.token_to_id("[MASK]") == tokenizer.token_to_id("[MASK]")


def test_loaded_model_gives_identical_logits_and_a_change_is_detected(tmp_path):
    model = _mdlm(time_conditioning=True).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = MDLM.from_pretrained(tmp_path / "m")
    assert loaded.training is False  # from_pretrained returns an eval-mode model
    ids, t = _inputs()
    with torch.no_grad():
        expected = model(ids, t)
        assert expected.shape == (3, 16, 64)
        assert expected.abs().max() > 0  # the perturbation made the zero-initialised head non-zero
        assert torch.equal(loaded(ids, t), expected)
        # The comparison has teeth: the same model with one weight changed gives different logits.
        loaded.backbone.final.linear.weight[0, 0] += 1e-3
        assert not torch.equal(loaded(ids, t), expected)
        other = _mdlm(seed=5, time_conditioning=True).eval()
        assert not torch.equal(other(ids, t), expected)


def test_ar_round_trip(tmp_path):
    model = _ar().eval()
    model.save_pretrained(tmp_path / "ar")
    loaded = ARModel.from_pretrained(tmp_path / "ar")
    assert type(loaded) is ARModel
    assert loaded.config == model.config and loaded.noise_config is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    config = json.loads((tmp_path / "ar" / "config.json").read_text())
    assert config["model_type"] == "ar" and config["noise"] is None


def test_load_pretrained_picks_the_class(tmp_path):
    _mdlm().save_pretrained(tmp_path / "mdlm")
    _ar().save_pretrained(tmp_path / "ar")
    assert type(mdlm.load_pretrained(tmp_path / "mdlm")) is MDLM
    assert type(mdlm.load_pretrained(str(tmp_path / "ar"))) is ARModel


def test_directory_layout(tmp_path, tokenizer):
    _mdlm().save_pretrained(tmp_path / "plain")
    assert sorted(os.listdir(tmp_path / "plain")) == ["config.json", "model.safetensors"]
    _mdlm(tokenizer=tokenizer).save_pretrained(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["model_type"] == "mdlm"
    assert config["format_version"] == 1
    assert config["model"]["vocab_size"] == 64 and config["model"]["mask_token_id"] == 63
    assert config["noise"]["schedule"] == "cosine"


def test_read_model_config_needs_no_weights(tmp_path):
    model = _mdlm()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    config = read_model_config(tmp_path / "m")
    assert config.model_type == "mdlm" and config.model_config == model.config
    assert config.noise_config == model.noise_config
    assert config.raw == json.loads((tmp_path / "m" / "config.json").read_text())
    assert TOKENIZER_NAME == TOKENIZER_FILE == "tokenizer.json"
    _edit_config(tmp_path / "m", lambda c: c.update(model_type="gpt"))
    with pytest.raises(ConfigError, match="model_type") as info:
        read_model_config(tmp_path / "m")
    assert "config.json" in str(info.value)
    with pytest.raises(FileNotFoundError):
        read_model_config(tmp_path / "nope")


def test_save_into_nested_new_directory(tmp_path):
    target = tmp_path / "a" / "b" / "model"
    _mdlm().save_pretrained(target)
    assert (target / "model.safetensors").is_file()


def test_from_pretrained_wrong_class_raises(tmp_path):
    _ar().save_pretrained(tmp_path / "ar")
    with pytest.raises(ValueError, match="'ar' model"):
        MDLM.from_pretrained(tmp_path / "ar")
    _mdlm().save_pretrained(tmp_path / "mdlm")
    with pytest.raises(ValueError, match="'mdlm' model"):
        ARModel.from_pretrained(tmp_path / "mdlm")


def test_missing_directory_raises(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        MDLM.from_pretrained(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):
        mdlm.load_pretrained(missing)


def test_missing_config_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        mdlm.load_pretrained(tmp_path / "empty")


def test_invalid_json_raises(tmp_path):
    _mdlm().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON") as info:
        MDLM.from_pretrained(tmp_path / "m")
    assert "config.json" in str(info.value)


def _edit_config(directory, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_unknown_model_key_raises(tmp_path):
    _mdlm().save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", lambda c: c["model"].update(hiden_size=3))
    with pytest.raises(ConfigError, match=r"model\.hiden_size") as info:
        MDLM.from_pretrained(tmp_path / "m")
    assert "hidden_size" in str(info.value).split("hiden_size", 1)[1]  # the suggestion


def test_wrong_typed_noise_key_raises(tmp_path):
    _mdlm().save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", lambda c: c["noise"].update(schedule="bogus"))
    with pytest.raises(ConfigError, match=r"noise\.schedule"):
        MDLM.from_pretrained(tmp_path / "m")


def test_bad_model_type_raises(tmp_path):
    _mdlm().save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", lambda c: c.update(model_type="gpt"))
    with pytest.raises(ConfigError, match="model_type"):
        mdlm.load_pretrained(tmp_path / "m")


def test_missing_weights_raise(tmp_path):
    _mdlm().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        MDLM.from_pretrained(tmp_path / "m")


def test_weights_of_another_shape_raise(tmp_path):
    _mdlm().save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", lambda c: c["model"].update(n_layers=2))
    with pytest.raises(RuntimeError):
        MDLM.from_pretrained(tmp_path / "m")


def test_saving_over_existing_dir_replaces_it(tmp_path, tokenizer):
    target = tmp_path / "m"
    first = _mdlm(seed=1, tokenizer=tokenizer)
    first.save_pretrained(target)
    (target / "stale.txt").write_text("from an older save")
    second = _mdlm(seed=2)  # no tokenizer this time
    second.save_pretrained(target)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    loaded = MDLM.from_pretrained(target)
    assert loaded.tokenizer is None
    for name, tensor in second.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    head = "backbone.final.linear.weight"
    assert not torch.equal(loaded.state_dict()[head], first.state_dict()[head])
    assert os.listdir(tmp_path) == ["m"]  # no .tmp- / .old- siblings left behind


def test_save_pretrained_with_explicit_state_dict(tmp_path):
    model = _mdlm(seed=3)
    other = _mdlm(seed=4)
    model.save_pretrained(tmp_path / "m", state_dict=other.state_dict())
    loaded = MDLM.from_pretrained(tmp_path / "m")
    for name, tensor in other.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_failed_replace_keeps_previous_model(tmp_path, monkeypatch):
    target = tmp_path / "m"
    first = _mdlm(seed=1)
    first.save_pretrained(target)
    real_rename = type(target).rename

    def flaky_rename(self, new):
        if ".tmp-" in self.name:
            raise OSError("simulated failure while moving the new model into place")
        return real_rename(self, new)

    monkeypatch.setattr(type(target), "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        _mdlm(seed=2).save_pretrained(target)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m"]
    loaded = MDLM.from_pretrained(target)
    head = "backbone.final.linear.weight"
    assert torch.equal(loaded.state_dict()[head], first.state_dict()[head])

"""``save_pretrained`` / ``from_pretrained`` / ``load_pretrained``: bit-exact round trips and clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mdlm
from mdlm.config import ConfigError, NoiseConfig, load_config, model_config_for
from mdlm.data.tokenizer import TOKENIZER_FILE, special_tokens, train_bpe
from mdlm.hf_hub import is_repo_id
from mdlm.hub import MODEL_FILES, TOKENIZER_NAME, read_model_config
from mdlm.model_card import ModelCardInfo
from mdlm.modeling import MDLM, ARModel
from tests.serve_support import SENTENCES

ROOT = Path(__file__).resolve().parents[1]


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
    """A model of 64 tokens, or with the vocabulary and special ids of ``tokenizer``."""
    vocab = {"vocab_size": 64, "mask_token_id": 63}
    if tokenizer is not None:
        special = special_tokens(tokenizer)
        vocab = {"vocab_size": special.vocab_size, "mask_token_id": special.mask_id, "bos_token_id": special.bos_id,
                 "eos_token_id": special.eos_id, "pad_token_id": special.pad_id}
    config = model_config_for("cpu", max_seq_len=16, **vocab, **changes)
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
    assert loaded.mask_id == model.mask_id == tokenizer.token_to_id("[MASK]") == 299


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
    assert sorted(os.listdir(tmp_path / "plain")) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == "mdlm"
    assert config["format_version"] == 1
    assert config["model"]["vocab_size"] == 64 and config["model"]["mask_token_id"] == 63
    assert config["noise"]["schedule"] == "cosine"
    _mdlm(tokenizer=tokenizer).save_pretrained(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == sorted(["README.md", "config.json", "model.safetensors",
                                                          "tokenizer.json", "tokenizer_config.json",
                                                          "special_tokens_map.json"])
    assert sorted(MODEL_FILES) == sorted(os.listdir(tmp_path / "tok"))
    special_map = json.loads((tmp_path / "tok" / "special_tokens_map.json").read_text())
    assert special_map == {"mask_token": "[MASK]", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                           "pad_token": "[PAD]"}
    tokenizer_config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 16 and tokenizer_config["mask_token"] == "[MASK]"
    # Weights stay safetensors; everything else is text (JSON, the card): no pickles.
    with safe_open(str(tmp_path / "tok" / "model.safetensors"), framework="pt") as weights:
        assert len(list(weights.keys())) == len(_mdlm().state_dict())
    for name in set(MODEL_FILES) - {"model.safetensors"}:
        text = (tmp_path / "tok" / name).read_text(encoding="utf-8")
        assert name == "README.md" or isinstance(json.loads(text), dict), name


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
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "model.safetensors"]
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


# --- Hugging Face conventions: tokenizer files, model card, Hub repo ids ---------------------------------------

TEXTS = ["To be, or not to be, that is the question.", "  leading spaces\n\n\ttabs and  double  spaces  ",
         "naïve café — “quotes” 日本語 🙂", "x", "", "hello<|endoftext|>world [MASK] again[PAD]"]


def test_saving_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, tokenizer):
    model = _mdlm()  # 64 tokens
    model.tokenizer = tokenizer  # 300 tokens
    with pytest.raises(ValueError, match=r"model\.vocab_size=64") as info:
        model.save_pretrained(tmp_path / "m")
    assert "300 tokens" in str(info.value)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary directory left


def test_transformers_autotokenizer_loads_the_saved_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    model = _mdlm(tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "m")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    config = model.config
    assert hf.is_fast
    assert (hf.mask_token, hf.mask_token_id) == ("[MASK]", config.mask_token_id) and config.mask_token_id == 299
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (config.bos_token_id, config.eos_token_id,
                                                                   config.pad_token_id)
    assert hf.pad_token_id != hf.eos_token_id
    assert len(hf) == config.vocab_size and hf.model_max_length == config.max_seq_len
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert hf(text)["input_ids"] == ids == hf.encode(text), repr(text)
        assert hf.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False), repr(text)
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), repr(text)
    assert hf.encode("[MASK]") == [config.mask_token_id]
    batch = hf(["To be", "To be, or not to be"], padding=True)
    short = tokenizer.encode("To be").ids
    assert batch["input_ids"][0][len(short):] and set(batch["input_ids"][0][len(short):]) == {config.pad_token_id}
    assert batch["attention_mask"][0] == [1] * len(short) + [0] * (len(batch["input_ids"][0]) - len(short))


def test_model_card_describes_the_model_data_and_training(tmp_path, tokenizer):
    from huggingface_hub import ModelCard

    model = _mdlm(tokenizer=tokenizer)
    info = ModelCardInfo(repo_id="someone/mdlm-tiny", dataset="hf:lm1b", tokenizer="bpe",
                         training={"optimizer steps": 300, "tokens seen": 1228800}, metrics={"val_nelbo": 3.21875})
    model.save_pretrained(tmp_path / "m", card=info)
    card = ModelCard.load(tmp_path / "m" / "README.md")  # the Hub client's own parser
    assert card.data.library_name == "mdlm" and card.data.pipeline_tag == "text-generation"
    assert "mdlm" in card.data.tags and card.data.datasets == ["lm1b"]
    text = card.text
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters > 10_000
    assert f"| parameters | {parameters:,} |" in text
    assert f"| parameters without the input embedding | {parameters - 300 * model.config.hidden_size:,} |" in text
    assert f"| transformer blocks | {model.config.n_layers} |" in text and "| context length (tokens) | 16 |" in text
    assert "| schedule | `cosine` |" in text and "| t sampled from | `U[0.0001, 1]` |" in text
    assert "| mask_token | `[MASK] (id 299)` |" in text
    assert "| bos_token | `<\\|endoftext\\|> (id 0)` |" in text  # the pipes escaped, or the table breaks
    assert "Trained on `hf:lm1b`" in text and "`tokenizer.json` (bpe), 300 tokens" in text
    assert "| optimizer steps | 300 |" in text and "| tokens seen | 1,228,800 |" in text
    assert "| val_nelbo | 3.219 |" in text
    assert 'mdlm.load_pretrained("someone/mdlm-tiny")' in text and text.count("# someone/mdlm-tiny") == 1


def test_model_card_of_an_ar_model_without_tokenizer(tmp_path):
    from huggingface_hub import ModelCard

    model = _ar()
    model.save_pretrained(tmp_path / "ar")
    card = ModelCard.load(tmp_path / "ar" / "README.md")
    assert "ar" in card.data.tags and "autoregressive" in card.data.tags
    assert "## Noise process" not in card.text and "Saved without a tokenizer" in card.text
    assert "## Training" not in card.text and "## Data" not in card.text
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in card.text
    assert "| attention | `causal` |" in card.text


def test_card_info_from_a_training_config():
    config = load_config("cpu", ["training.max_steps=40", "training.global_batch_size=64", "data.tokenizer=gpt2"])
    info = ModelCardInfo.from_training(config, steps=40, tokens_seen=40 * 64 * 128, workers=2,
                                       metrics={"val_nelbo": 4.5})
    assert info.dataset == config.data.source and info.tokenizer == "gpt2"
    assert info.training["optimizer steps"] == 40 and info.training["tokens seen"] == 327680
    assert info.training["global batch (rows)"] == 64 and info.training["workers"] == 2
    assert info.training["peak learning rate"] == config.training.lr and info.metrics == {"val_nelbo": 4.5}


@pytest.mark.parametrize("text, expected", [
    ("owner/name", True), ("kuleshov-group/mdlm-owt", True), ("a1/b.c_d-e", True),
    ("/abs/path", False), ("./a/b", False), ("a/b/c", False), ("name", False), ("s3://bucket/m", False),
    ("models:/mdlm@current", False), ("a--b/c", False), ("a/..", False), ("a/b.", False), ("-a/b", False),
])
def test_repo_ids(text, expected):
    assert is_repo_id(text) is expected


def _populate_hub_cache(hf_home, repo_id: str, folder, commit: str) -> None:
    """Lay ``folder`` out as the Hub client leaves a downloaded model repo in its cache: blobs by hash, a snapshot
    of relative links to them, and refs/main naming the commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for directory in (repo / "blobs", snapshot, repo / "refs"):
        directory.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(commit)


HUB_CHILD = r"""
import json, os, sys, torch, mdlm
from mdlm.hub import resolve_model_dir
from mdlm.modeling import MDLM, ARModel

repo, commit = sys.argv[1], sys.argv[2]
ids = torch.arange(16).remainder(300)[None]
out = {"resolved": str(resolve_model_dir(repo))}
model = MDLM.from_pretrained(repo)
with torch.no_grad():
    out["logits"] = model(ids, torch.tensor([0.5])).tolist()
out["tokens"] = model.tokenizer.encode("To be, or not to be").ids
out["by_commit"] = str(resolve_model_dir(repo, revision=commit))
out["load_pretrained"] = type(mdlm.load_pretrained(repo, revision=commit)).__name__
for name, call in (("missing", lambda: mdlm.load_pretrained("mdlm-tests/missing")),
                   ("bad_revision", lambda: mdlm.load_pretrained(repo, revision="v9")),
                   ("push", lambda: model.push_to_hub(repo, token="hf_test")),
                   ("push_bad_id", lambda: model.push_to_hub("not a repo id"))):
    try:
        call()
        out[name] = "no error"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
os.chdir(sys.argv[3])  # a local directory of the same name wins over the Hub
out["local"] = type(mdlm.load_pretrained(repo)).__name__
print(json.dumps(out))
"""


def test_from_pretrained_of_a_hub_repo_id_offline_from_the_cache(tmp_path, tokenizer):
    repo_id, commit = "mdlm-tests/tiny", "0123456789abcdef0123456789abcdef01234567"
    model = _mdlm(tokenizer=tokenizer, time_conditioning=True).eval()
    model.save_pretrained(tmp_path / "saved", card=ModelCardInfo(repo_id=repo_id))
    hf_home = tmp_path / "hf"
    _populate_hub_cache(hf_home, repo_id, tmp_path / "saved", commit)
    shadow = tmp_path / "cwd"
    _ar().save_pretrained(shadow / "mdlm-tests" / "tiny")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path / "tmp"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", HUB_CHILD, repo_id, commit, str(shadow)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    snapshot = hf_home / "hub" / "models--mdlm-tests--tiny" / "snapshots" / commit
    assert out["resolved"] == out["by_commit"] == str(snapshot)
    with torch.no_grad():
        expected = model(torch.arange(16).remainder(300)[None], torch.tensor([0.5]))
    assert expected.abs().max() > 0 and torch.equal(torch.tensor(out["logits"]), expected)
    assert out["tokens"] == tokenizer.encode("To be, or not to be").ids
    assert out["load_pretrained"] == "MDLM" and out["local"] == "ARModel"
    assert out["missing"].startswith("FileNotFoundError") and "'mdlm-tests/missing'" in out["missing"]
    assert "HF_HUB_OFFLINE" in out["missing"]
    assert out["bad_revision"].startswith("FileNotFoundError") and "revision 'v9'" in out["bad_revision"]
    # Offline, the upload stops at the Hub client's first request; its temporary folder is gone.
    assert out["push"].startswith("OfflineModeIsEnabled"), out["push"]
    assert os.listdir(tmp_path / "tmp") == []
    assert out["push_bad_id"].startswith("ValueError: repo_id") and "'not a repo id'" in out["push_bad_id"]


def test_models_uri_and_fsspec_url_bring_every_file(tmp_path, tokenizer, monkeypatch):
    from mdlm import tracking
    from mdlm.hub import resolve_model_dir

    model = _mdlm(tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "m")
    by_url = resolve_model_dir(f"file://{tmp_path / 'm'}")
    assert sorted(os.listdir(by_url)) == sorted(MODEL_FILES)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "hub-test", tmp_path / "artifacts")
    run_id = tracking.create_run(uri, experiment, "hub", {})
    source = tracking.log_artifacts(uri, run_id, tmp_path / "m", "model")
    tracking.register_model(uri, run_id, source, "hub-test-model", "current")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mdlm.load_pretrained("models:/hub-test-model@current")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert sorted(os.listdir(resolve_model_dir("models:/hub-test-model@current"))) == sorted(MODEL_FILES)

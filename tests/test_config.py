"""The typed config tree: defaults, presets, ``base:`` chaining, overrides, type and semantic checks."""

from __future__ import annotations

import dataclasses

import pytest

from mdlm.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    NoiseConfig,
    RunConfig,
    SamplingConfig,
    TrainingConfig,
    config_from_dict,
    load_config,
    model_config_for,
    parse_override,
    preset_names,
)
from mdlm.data.spec import DataSpec, resolve_model_config
from mdlm.data.tokenizer import special_tokens, tokenizer_from_spec

SECTIONS = {"model": ModelConfig, "noise": NoiseConfig, "training": TrainingConfig,
            "sampling": SamplingConfig, "data": DataConfig, "run": RunConfig}


# ---------------------------------------------------------------------------------------------------------
# Defaults and presets


def test_defaults_validate_and_match_dataclass_defaults():
    config = Config()
    assert config.validate() is config
    assert load_config() == config
    assert config.model.vocab_size == 50258 and config.model.mask_token_id == 50257
    assert config.training.lr == 3e-4 and config.training.warmup_steps == 2500


def test_preset_names_lists_the_shipped_presets():
    names = preset_names()
    assert names == sorted(names)
    assert {"cpu", "tiny", "small", "medium", "ar-small", "lm1b-small"} <= set(names)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name):
    config = load_config(name)
    assert isinstance(config, Config)
    assert config.validate() is config
    assert config != Config()  # every preset changes something


def test_cpu_preset_values():
    config = load_config("cpu")
    assert (config.model.hidden_size, config.model.n_layers, config.model.n_heads) == (128, 4, 4)
    assert config.model.cond_dim == 64
    assert config.training.lr == pytest.approx(1e-3) and isinstance(config.training.lr, float)
    assert config.training.lr_schedule == "cosine"
    assert config.training.precision == "fp32"
    assert config.sampling.steps == 128


def test_base_chaining_small_inherits_tiny_data():
    tiny, small = load_config("tiny"), load_config("small")
    assert small.data == tiny.data
    assert small.data.tokenizer == "gpt2" and small.data.block_size == 1024 and small.data.packing == "wrap"
    assert (small.model.hidden_size, small.model.n_layers, small.model.n_heads) == (768, 12, 12)
    assert (tiny.model.hidden_size, tiny.model.n_layers, tiny.model.n_heads) == (512, 8, 8)
    # max_seq_len is only set in tiny.yaml
    assert small.model.max_seq_len == 1024


def test_base_chaining_two_levels():
    ar = load_config("ar-small")  # ar-small -> small -> tiny
    assert ar.model.kind == "ar"
    assert ar.model.hidden_size == 768
    assert ar.data == load_config("tiny").data
    medium = load_config("medium")
    assert (medium.model.hidden_size, medium.model.n_layers, medium.model.n_heads) == (1024, 24, 16)
    assert medium.data.tokenizer == "gpt2"


def test_lm1b_preset_overrides_base_data():
    config = load_config("lm1b-small")
    assert config.data.packing == "pad" and config.data.tokenizer == "bert-base-uncased"
    assert config.data.block_size == 128
    # The vocabulary and [MASK] id come from the data's tokenizer, resolved into the model config in one place.
    special = special_tokens(tokenizer_from_spec(config.data.tokenizer))
    model = resolve_model_config(config.model, DataSpec.from_special(special, config.data.block_size))
    assert model.mask_token_id == 103 and model.vocab_size == 30522 and model.max_seq_len == 128
    assert config.model.hidden_size == 768


def test_yaml_file_with_base_and_scientific_float(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: cpu\ntraining:\n  lr: 1e-3\n  max_steps: 7\nmodel:\n  n_layers: 2\n")
    config = load_config(path)
    assert config.training.lr == 1e-3 and isinstance(config.training.lr, float)  # YAML 1.1 reads a string
    assert config.training.max_steps == 7
    assert config.model.n_layers == 2
    assert config.model.hidden_size == 128  # from cpu
    assert load_config(str(path)) == config


def test_unknown_preset_name_raises():
    with pytest.raises(ConfigError, match="unknown preset 'nope'") as info:
        load_config("nope")
    assert "cpu" in str(info.value)  # lists the available ones


def test_missing_yaml_file_raises(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(missing)
    assert str(missing) in str(info.value)


def test_invalid_yaml_and_non_mapping_raise(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_unknown_key_in_yaml_file_raises(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("training:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError, match=r"training\.warmup_step'") as info:
        load_config(path)
    assert "warmup_steps" in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Overrides


def test_override_int():
    config = load_config("cpu", ["model.hidden_size=256"])
    assert config.model.hidden_size == 256 and type(config.model.hidden_size) is int


@pytest.mark.parametrize(("text", "expected"),
                         [("1e-3", 1e-3), ("1.0e-3", 1e-3), ("0.002", 0.002), ("1", 1.0)])
def test_override_float(text, expected):
    config = load_config(None, [f"training.lr={text}"])
    assert config.training.lr == expected
    assert type(config.training.lr) is float


def test_override_bool():
    assert load_config(None, ["model.time_conditioning=true"]).model.time_conditioning is True
    assert load_config(None, ["noise.antithetic=false"]).noise.antithetic is False


def test_override_null_for_optional():
    config = load_config(None, ["model.pad_token_id=5", "model.pad_token_id=null"])
    assert config.model.pad_token_id is None
    config = load_config(None, ["model.kind=ar", "model.mask_token_id=null"])
    assert config.model.kind == "ar" and config.model.mask_token_id is None
    config = load_config(None, ["noise.sigma_min=1e-4"])
    assert config.noise.sigma_min == 1e-4 and isinstance(config.noise.sigma_min, float)
    assert load_config(None, ["sampling.length=64", "sampling.length=null"]).sampling.length is None


def test_override_literal_choices():
    config = load_config(None, ["noise.schedule=cosine", "training.precision=fp32",
                                "sampling.sampler=first_hitting", "data.packing=pad"])
    assert config.noise.schedule == "cosine"
    assert config.training.precision == "fp32"
    assert config.sampling.sampler == "first_hitting"
    assert config.data.packing == "pad"


def test_override_wins_over_preset_and_keeps_other_preset_values():
    config = load_config("small", ["model.n_layers=3", "data.block_size=64"])
    assert config.model.n_layers == 3
    assert config.model.hidden_size == 768  # from small
    assert config.data.block_size == 64
    assert config.data.tokenizer == "gpt2"  # from tiny via small


def test_later_override_wins():
    assert load_config(None, ["training.seed=1", "training.seed=2"]).training.seed == 2


def test_parse_override_nested_dict():
    assert parse_override("model.hidden_size=256") == {"model": {"hidden_size": 256}}
    assert parse_override("data.source= a=b ") == {"data": {"source": "a=b"}}


@pytest.mark.parametrize("text", ["model.hidden_size", "=3", "model..x=3", ".x=1"])
def test_malformed_override_raises(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_unknown_key_names_full_key_and_suggests():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.hiden_size=5"])
    message = str(info.value)
    assert "'model.hiden_size'" in message
    assert "did you mean 'model.hidden_size'" in message


def test_unknown_section_raises_with_suggestion():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["modle.hidden_size=5"])
    assert "'modle'" in str(info.value) and "model" in str(info.value)


def test_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["training.zzzzzzzz=1"])
    assert "training.zzzzzzzz" in str(info.value)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(("override", "key"), [
    ("model.hidden_size=abc", "model.hidden_size"),
    ("model.hidden_size=1.5", "model.hidden_size"),
    ("model.hidden_size=true", "model.hidden_size"),
    ("model.time_conditioning=3", "model.time_conditioning"),
    ("model.time_conditioning=maybe", "model.time_conditioning"),
    ("noise.schedule=bogus", "noise.schedule"),
    ("training.lr=abc", "training.lr"),
    ("training.lr=true", "training.lr"),
    ("model.mask_token_id=abc", "model.mask_token_id"),
    ("data.source=123", "data.source"),
    ("training.warmup_steps=null", "training.warmup_steps"),
    ("model.hidden_size.x=1", "model.hidden_size"),
    ("model=5", "model"),
])
def test_wrong_type_raises_naming_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(key + ":") or f"'{key}'" in str(info.value), str(info.value)


def test_literal_error_lists_choices():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["noise.schedule=bogus"])
    assert "'bogus'" in str(info.value) and "'loglinear'" in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Semantic checks


@pytest.mark.parametrize(("overrides", "key"), [
    (["model.hidden_size=100"], "model.n_heads"),  # 100 % 8 != 0
    (["model.hidden_size=24", "model.n_heads=8"], "model.n_heads"),  # head dim 3 is odd
    (["model.mask_token_id=50258"], "model.mask_token_id"),
    (["model.mask_token_id=-1"], "model.mask_token_id"),
    (["model.mask_token_id=null"], "model.mask_token_id"),  # required for mdlm
    (["model.bos_token_id=99999"], "model.bos_token_id"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.kind=ar", "model.time_conditioning=true"], "model.time_conditioning"),
    (["model.n_layers=0"], "model.n_layers"),
    (["data.block_size=2"], "data.block_size"),
    (["data.validation_fraction=0.5", "data.test_fraction=0.5"], "data.test_fraction"),
    (["sampling.top_p=0"], "sampling.top_p"),
    (["sampling.top_p=1.5"], "sampling.top_p"),
    (["sampling.length=0"], "sampling.length"),
    (["sampling.length=2048"], "sampling.length"),  # > data.block_size (the model's max_seq_len) without stride
    (["sampling.stride=1024"], "sampling.stride"),
    (["sampling.confidence_threshold=1.5"], "sampling.confidence_threshold"),
    (["sampling.tokens_per_step=0"], "sampling.tokens_per_step"),
    (["sampling.remask_eta=-0.1"], "sampling.remask_eta"),
    (["sampling.remask_schedule=loop"], "sampling.remask_schedule"),
    (["model.kind=sedd", "sampling.sampler=remdm"], "sampling.sampler"),  # ReMDM is MDLM's posterior
    (["model.kind=d3pm", "noise.time=discrete", "sampling.sampler=confidence"], "sampling.sampler"),
    (["training.global_batch_size=100", "training.micro_batch_size=32"], "training.global_batch_size"),
    (["training.lr=0"], "training.lr"),
    (["training.ema_decay=1.0"], "training.ema_decay"),
    (["training.warmup_steps=-1"], "training.warmup_steps"),
    (["noise.sampling_eps=0"], "noise.sampling_eps"),
    (["noise.sigma_min=2", "noise.sigma_max=1"], "noise.sigma_min"),
    (["noise.schedule=geometric", "noise.sigma_min=0"], "noise.sigma_min"),
    (["run.placement_strategy=spread"], "run.placement_strategy"),  # Ray's names are upper case
])
def test_semantic_checks_name_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert key in str(info.value), str(info.value)


def test_semantic_boundaries_accepted():
    config = load_config(None, ["data.block_size=3", "sampling.top_p=1.0",
                                "training.global_batch_size=64", "training.micro_batch_size=32",
                                "sampling.length=2048", "sampling.stride=2"])  # stride < block_size
    assert config.data.block_size == 3 and config.sampling.length == 2048


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_from_dict_merges_over_base():
    base = load_config("cpu")
    merged = config_from_dict({"model": {"n_layers": 1}}, base=base)
    assert merged.model.n_layers == 1 and merged.model.hidden_size == 128
    assert base.model.n_layers == 4  # base untouched


# ---------------------------------------------------------------------------------------------------------
# flat() and model_config_for


def test_flat_keys():
    config = load_config("cpu")
    flat = config.flat()
    expected = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(flat) == expected
    assert flat["model.hidden_size"] == 128
    assert flat["training.lr"] == pytest.approx(1e-3)
    assert flat["data.tokenizer"] == "bpe"
    assert all(key.count(".") == 1 for key in flat)


def test_model_config_for_small():
    config = model_config_for("small")
    assert isinstance(config, ModelConfig)
    assert (config.hidden_size, config.n_heads, config.n_layers) == (768, 12, 12)


def test_model_config_for_changes_and_errors():
    config = model_config_for("cpu", vocab_size=64, mask_token_id=63, max_seq_len=16)
    assert (config.hidden_size, config.n_layers, config.n_heads, config.cond_dim) == (128, 4, 4, 64)
    assert (config.vocab_size, config.mask_token_id, config.max_seq_len) == (64, 63, 16)
    with pytest.raises(ConfigError, match="unknown model size"):
        model_config_for("huge")
    with pytest.raises(ConfigError, match=r"model\.hiden_size"):
        model_config_for("cpu", hiden_size=3)
    with pytest.raises(ConfigError, match=r"model\.mask_token_id"):
        model_config_for("cpu", vocab_size=64, mask_token_id=64)


def test_nan_learning_rate_is_rejected():
    with pytest.raises(ConfigError, match=r"training\.lr"):
        load_config(None, ["training.lr=nan"])


def test_an_elastic_range_is_checked_for_every_worker_count():
    config = load_config(None, ["run.min_workers=1", "run.num_workers=4", "training.global_batch_size=24",
                                "training.micro_batch_size=2"])
    assert list(config.run.world_sizes) == [1, 2, 3, 4]
    assert list(load_config(None, ["run.num_workers=3"]).run.world_sizes) == [3]  # fixed size
    with pytest.raises(ConfigError, match=r"run\.min_workers: must be between 1 and run\.num_workers 2, got 3"):
        load_config(None, ["run.min_workers=3", "run.num_workers=2"])
    with pytest.raises(ConfigError, match=r"run\.min_workers: must be between 1 .* got 0"):
        load_config(None, ["run.min_workers=0"])
    # 3 workers x micro-batches of 4 do not divide a global batch of 16: rejected before any worker starts
    with pytest.raises(ConfigError, match=r"training\.global_batch_size: 16 is not a multiple of micro_batch_size "
                                          r"x workers = 4 x 3 \(run\.num_workers/run\.min_workers\)"):
        load_config(None, ["run.min_workers=2", "run.num_workers=4", "training.global_batch_size=16",
                           "training.micro_batch_size=4"])


def test_base_cycle_raises_config_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="base"):
        load_config(tmp_path / "a.yaml")


def test_actor_cpu_share_is_planned_per_node():
    """Ray places an actor on one node: shares come from the nodes' CPUs, not the cluster's total, and every node
    keeps room for a read task (three 1-CPU nodes used to get 0.83-CPU actors, leaving no node a read slot)."""
    from mdlm.runtime import READ_CPUS, actor_cpu_share, actors_that_fit

    assert actor_cpu_share([2.0], 1) == 1.0 and actor_cpu_share([2.0], 2) == 0.75  # one node: (C - 0.5) / n
    assert actor_cpu_share([8.0], 4) == 1.0
    share = actor_cpu_share([0.0, 1.0, 1.0, 1.0], 3)  # a head without CPUs and three 1-CPU workers
    assert share == 0.75 and share + READ_CPUS <= 1.0
    assert actors_that_fit([0.0, 1.0, 1.0, 1.0], share) == 3
    assert actors_that_fit([0.0, 1.0, 1.0, 1.0], 0.83) == 0  # what the cluster-total share gave: nothing fits
    six = actor_cpu_share([1.0, 1.0, 1.0], 6)
    assert actors_that_fit([1.0, 1.0, 1.0], six) >= 6 and 2 * six + READ_CPUS <= 1.0
    assert actor_cpu_share([1.0], 40) == 0.05  # nothing fits: the floor

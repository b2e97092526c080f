"""One typed config tree for every mdlm entry point.

``Config`` holds the sections a training run uses (model, noise, training, sampling, data, run) and those of the
other commands: ``eval`` (``mdlm evaluate``, :class:`mdlm.eval.settings.EvalRequest`), ``generate``
(``mdlm generate``) and ``serve`` (``mdlm serve``, :class:`mdlm.serve.settings.ServeConfig`, a pydantic model
that Ray Serve's typed application builder also validates). A command's config is built from
the defaults below, then a YAML preset (``cpu``, ``tiny``, ``small``, ``medium`` ... or a file), then
``a.b=value`` overrides from the command line. Unknown keys and wrongly typed values raise
``ConfigError`` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from mdlm.config_base import (
    DIFFUSION_KINDS,
    KIND_SAMPLERS,
    MODEL_KINDS,
    REMASK_SCHEDULES,
    SAMPLERS,
    ConfigError,
    ModelKind,
    RemaskSchedule,
    SamplerName,
    ScheduleName,
    model_from_dict,
)
from mdlm.eval import EvalInputError
from mdlm.eval.settings import DEFAULT_MODEL, EvalRequest
from mdlm.serve.settings import ServeConfig

PRESET_DIR = Path(__file__).parent / "presets"

# The shared names live in mdlm.config_base (no mdlm imports there, so sections defined elsewhere can use them).
__all__ = ["DIFFUSION_KINDS", "KIND_SAMPLERS", "MODEL_KINDS", "REMASK_SCHEDULES", "SAMPLERS", "Config", "ConfigError",
           "DataConfig", "EvalRequest", "GenerateConfig", "ModelConfig", "ModelKind", "NoiseConfig",
           "RemaskSchedule", "RunConfig", "SamplerName", "SamplingConfig", "ScheduleName", "ServeConfig",
           "TrainingConfig", "load_config"]


@dataclass
class ModelConfig:
    """Backbone shape. ``vocab_size`` includes the [MASK] token.

    ``vocab_size``, the special token ids and ``max_seq_len`` describe the data, not the architecture: a model
    trained by the pipelines gets them from the prepared data (``mdlm.data.spec.resolve_model_config``); the
    defaults here (GPT-2 + [MASK], 1,024 tokens) serve models built by hand.
    """

    # mdlm: SUBS + NELBO (the paper); sedd: SEDD absorbing (score entropy); d3pm: D3PM absorbing (T-step ELBO,
    # no SUBS); ar: the autoregressive baseline. All but ar share the masked forward process and samplers.
    kind: ModelKind = "mdlm"
    hidden_size: int = 512
    n_layers: int = 8
    n_heads: int = 8
    cond_dim: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.1
    vocab_size: int = 50258
    mask_token_id: int | None = 50257
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    max_seq_len: int = 1024
    time_conditioning: bool = False
    rope_base: float = 10000.0
    # Output-layer columns rounded up to a multiple of this (64 suits GPU matmuls); the extra logits are
    # dropped before any softmax, so the model is the same. 1 = no padding.
    vocab_pad_multiple: int = 1

    def validate(self, prefix: str = "model") -> None:
        check_positive(self, prefix, "hidden_size", "n_layers", "n_heads", "cond_dim", "mlp_ratio", "vocab_size",
                  "max_seq_len", "rope_base", "vocab_pad_multiple")
        if self.hidden_size % self.n_heads:
            raise ConfigError(f"{prefix}.n_heads: hidden_size {self.hidden_size} is not divisible by "
                              f"n_heads {self.n_heads}")
        if (self.hidden_size // self.n_heads) % 2:
            raise ConfigError(f"{prefix}.n_heads: head dim {self.hidden_size // self.n_heads} must be even "
                              "for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout: {self.dropout} is not in [0, 1)")
        if self.kind in DIFFUSION_KINDS:
            if self.mask_token_id is None:
                raise ConfigError(f"{prefix}.mask_token_id: required for kind '{self.kind}'")
            if not 0 <= self.mask_token_id < self.vocab_size:
                raise ConfigError(f"{prefix}.mask_token_id: {self.mask_token_id} is outside the vocabulary "
                                  f"[0, {self.vocab_size})")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{prefix}.{name}: {value} is outside the vocabulary [0, {self.vocab_size})")
        if self.kind == "ar" and self.time_conditioning:
            raise ConfigError(f"{prefix}.time_conditioning: the autoregressive model has no time input")


MODEL_SIZES: dict[str, dict[str, int]] = {
    # CPU-sized model for the demo and tests.
    "cpu": {"hidden_size": 128, "n_layers": 4, "n_heads": 4, "cond_dim": 64},
    "tiny": {"hidden_size": 512, "n_layers": 8, "n_heads": 8},
    "small": {"hidden_size": 768, "n_layers": 12, "n_heads": 12},
    "medium": {"hidden_size": 1024, "n_layers": 24, "n_heads": 16},
}


@dataclass
class NoiseConfig:
    """Forward process and NELBO estimator."""

    schedule: ScheduleName = "loglinear"
    # sigma(t) range for the 'linear' and 'geometric' schedules (None: the schedule's own default).
    sigma_min: float | None = None
    sigma_max: float | None = None
    sampling_eps: float = 1e-3
    time: Literal["continuous", "discrete"] = "continuous"
    num_timesteps: int = 1000
    antithetic: bool = True
    aux_ce_weight: float = 0.0  # D3PM's auxiliary cross-entropy weight lambda (training loss only; kind d3pm)
    # SUBS carry-over unmasking in the objective (MDLM). false: the paper's ablation, in which the denoiser's
    # predictions at unmasked positions are scored too (a looser bound); samplers always keep given tokens.
    carry_over: bool = True

    def validate(self, prefix: str = "noise") -> None:
        if not 0.0 < self.sampling_eps < 1.0:
            raise ConfigError(f"{prefix}.sampling_eps: {self.sampling_eps} is not in (0, 1)")
        check_positive(self, prefix, "num_timesteps")
        if self.sigma_min is not None and self.sigma_min < 0:
            raise ConfigError(f"{prefix}.sigma_min: must be >= 0, got {self.sigma_min}")
        if self.schedule == "geometric" and self.sigma_min == 0:
            raise ConfigError(f"{prefix}.sigma_min: the geometric schedule needs sigma_min > 0")
        if not self.aux_ce_weight >= 0:
            raise ConfigError(f"{prefix}.aux_ce_weight: must be >= 0, got {self.aux_ce_weight}")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ConfigError(f"{prefix}.sigma_min: {self.sigma_min} must be below sigma_max {self.sigma_max}")


@dataclass
class TrainingConfig:
    """Optimisation defaults follow the paper (AdamW 3e-4, 2,500 warmup steps, constant, clip 1.0)."""

    max_steps: int = 10000
    global_batch_size: int = 512
    micro_batch_size: int = 32
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: Literal["fp32", "bf16"] = "bf16"
    seed: int = 0
    log_every: int = 10

    def validate(self, prefix: str = "training") -> None:
        check_positive(self, prefix, "max_steps", "global_batch_size", "micro_batch_size", "lr", "log_every")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"{prefix}.global_batch_size: {self.global_batch_size} is not a multiple of "
                              f"micro_batch_size {self.micro_batch_size}")
        for name in ("beta1", "beta2", "ema_decay", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0 + (name == "min_lr_ratio"):
                raise ConfigError(f"{prefix}.{name}: {getattr(self, name)} is out of range")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "adam_eps"):
            if not getattr(self, name) >= 0:  # also rejects NaN
                raise ConfigError(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class SamplingConfig:
    """Generation settings. Categorical draws are float64 unless ``dtype='float32'`` (reference behaviour)."""

    sampler: SamplerName = "cached"
    steps: int = 1000
    num_samples: int = 4
    length: int | None = None  # None: the model's max_seq_len
    stride: int | None = None  # semi-autoregressive: new tokens per extra round
    top_p: float = 1.0
    dtype: Literal["float64", "float32"] = "float64"
    seed: int = 0
    # sampler=confidence: unmask every masked position whose most likely token has probability above this
    # (Fast-dLLM's 0.9), and at least the most confident one per step.
    confidence_threshold: float = 0.9
    # sampler=confidence_k: positions unmasked per step (None: ceil(masked tokens / steps)).
    tokens_per_step: int | None = None
    # sampler=remdm: sigma_t = min(eta, sigma_max) ('cap') or eta * sigma_max ('rescale'), eta = remask_eta.
    remask_schedule: RemaskSchedule = "cap"
    remask_eta: float = 0.01
    # semi-autoregressive windows: an approximate prefix KV cache over each window's given leading tokens
    # (mdlm.models.dit.PrefixKV; not exact, opt-in): later passes compute only the positions after them.
    prefix_cache: bool = False

    def validate(self, prefix: str = "sampling") -> None:
        check_positive(self, prefix, "steps", "num_samples")
        for name in ("length", "stride", "tokens_per_step"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{prefix}.{name}: must be > 0, got {value}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{prefix}.top_p: {self.top_p} is not in (0, 1]")
        for name in ("confidence_threshold", "remask_eta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{prefix}.{name}: {getattr(self, name)} is not in [0, 1]")


@dataclass
class DataConfig:
    """Corpus, tokenizer and packing."""

    # 'shakespeare' (default corpus), a file, directory, glob or fsspec URL (file://, s3://, gs://) of
    # .txt / .jsonl / .parquet files, or a Hugging Face dataset 'hf:NAME' / 'hf:NAME:CONFIG'
    source: str = "shakespeare"
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"  # auto: by file extension
    text_field: str = "text"  # jsonl field / parquet or Hugging Face column holding the text
    encoding: str = "utf-8"
    hf_split: str = "train"  # the Hugging Face split to read (then split by document like any source)
    max_document_chars: int = 20000  # text files are cut at blank lines into documents of about this size
    max_files: int | None = None  # use only the first N files (sorted): quick runs
    tokenizer: str = "bpe"  # 'bpe' (train on the corpus), 'gpt2', 'bert-base-uncased', or a tokenizer.json path
    tokenizer_vocab_size: int = 1024
    block_size: int = 128
    packing: Literal["wrap", "pad"] = "wrap"
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0  # seed of the by-document split
    output_dir: str = "data/prepared"
    num_workers: int | None = None  # tokenizer actors (None: one per CPU of the Ray cluster)
    batch_size: int = 64  # documents per tokenizer call
    file_size_mb: float = 64.0  # uncompressed size of each output parquet file
    force: bool = False  # re-prepare even if output_dir holds the same data

    def validate(self, prefix: str = "data") -> None:
        if self.block_size < 3:
            raise ConfigError(f"{prefix}.block_size: {self.block_size} is below 3 ([BOS] + token + [EOS])")
        check_positive(self, prefix, "tokenizer_vocab_size")
        for name in ("validation_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{prefix}.{name}: {getattr(self, name)} is not in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"{prefix}.test_fraction: validation + test fractions leave no training data")
        check_positive(self, prefix, "max_document_chars", "batch_size", "file_size_mb")
        for name in ("max_files", "num_workers"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("source", "text_field", "output_dir", "tokenizer", "hf_split"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{prefix}.{name}: may not be empty")
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"{prefix}.encoding: unknown encoding {self.encoding!r}") from None


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RunConfig:
    """Where and how a distributed training run executes (Ray Train, MLflow, checkpoints)."""

    name: str = "mdlm"
    storage_path: str = "runs/ray"  # local path or any pyarrow/fsspec URL (s3://, gs://, ...)
    num_workers: int = 2  # Ray Train workers; with min_workers, the most an elastic worker group has
    min_workers: int | None = None  # elastic: the group runs on min_workers..num_workers, whatever fits (None: fixed)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on CPU: two workers and the driver's work share a 2-core machine
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    threads_per_worker: int | None = None  # torch intra-op threads per worker (None: Ray's OMP_NUM_THREADS)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_failures: int = 2
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 20
    shuffle_buffer: int = 1024  # rows in each worker's seeded local shuffle buffer (0: stream order)
    activation_checkpointing: bool = False
    compile: bool = False
    mlflow_experiment: str = "mdlm"
    registered_model: str | None = "auto"  # auto: 'mdlm' for MDLM, 'mdlm-ar' for the AR baseline; null: none
    model_alias: str = "current"
    export_dir: str | None = None  # default: <storage_path>/<name>/model
    resume_from: str | None = None
    fail_at_step: int | None = None  # fault injection: raise once at this step (tests worker recovery)

    def validate(self, prefix: str = "run") -> None:
        check_positive(self, prefix, "num_workers", "cpus_per_worker", "checkpoint_every", "keep_checkpoints",
                       "eval_batches")
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(f"{prefix}.name: {self.name!r} must be a non-empty name without slashes or spaces")
        if self.max_failures < -1:
            raise ConfigError(f"{prefix}.max_failures: must be >= -1 (-1: retry forever), got {self.max_failures}")
        for name in ("eval_every", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"{prefix}.placement_strategy: {self.placement_strategy!r} is not one of "
                              f"{', '.join(PLACEMENT_STRATEGIES)}")
        if self.model_alias.lower() == "latest":
            raise ConfigError(f"{prefix}.model_alias: 'latest' is reserved by MLflow")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"{prefix}.min_workers: must be between 1 and run.num_workers {self.num_workers}, "
                              f"got {self.min_workers}")

    @property
    def world_sizes(self) -> range:
        """The numbers of workers the run may train on."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    @property
    def is_elastic(self) -> bool:
        """The worker group may take more than one size (Ray Train's elastic scaling)."""
        return len(self.world_sizes) > 1


def accumulation_steps(training: TrainingConfig, world: int, workers_key: str = "run.num_workers") -> int:
    """Micro-batches per worker per optimizer step: ``global_batch_size / (micro_batch_size x world)``, which must
    be whole (the error names ``workers_key`` as the setting that gave ``world``)."""
    micro = training.micro_batch_size
    if training.global_batch_size % (micro * world):
        raise ConfigError(f"training.global_batch_size: {training.global_batch_size} is not a multiple of "
                          f"micro_batch_size x workers = {micro} x {world} ({workers_key})")
    return training.global_batch_size // (micro * world)


@dataclass
class GenerateConfig:
    """``mdlm generate``: which model to sample from and what to continue; how is the ``sampling`` section."""

    model: str = DEFAULT_MODEL  # dir, fsspec URL, models:/NAME@ALIAS or runs:/ID/model
    prompts: list[str] = field(default_factory=list)  # each continued sampling.num_samples times; []: unconditional
    device: Literal["cpu", "cuda"] = "cpu"
    output: str | None = None  # also write the samples to this JSON file

    def validate(self, prefix: str = "generate") -> None:
        if not self.model.strip():
            raise ConfigError(f"{prefix}.model: may not be empty")
        if self.output is not None and not self.output.strip():
            raise ConfigError(f"{prefix}.output: may not be empty (leave it unset to only print)")


# The sections that shape a training run: its MLflow params (Config.flat) and what a resumed run must match.
TRAINING_SECTIONS = ("model", "noise", "training", "sampling", "data", "run")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalRequest = field(default_factory=EvalRequest)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)  # validated when built (pydantic)

    def validate(self) -> Config:
        for name in (*TRAINING_SECTIONS, "generate"):
            getattr(self, name).validate(name)
        try:
            self.eval.validate_settings()
        except EvalInputError as exc:
            raise ConfigError(exc.describe(f"eval.{exc.field}")) from None
        # An elastic run's global batch must be whole for every size its worker group may take (a fixed size is
        # checked by the workers: the single-process presets leave run.num_workers unused).
        for world in self.run.world_sizes if self.run.min_workers is not None else ():
            accumulation_steps(self.training, world, "run.num_workers/run.min_workers")
        kind = self.model.kind
        if kind == "sedd" and self.noise.time != "continuous":
            raise ConfigError("noise.time: SEDD's score-entropy bound is continuous in time (model.kind=sedd)")
        if kind == "d3pm" and self.noise.time != "discrete":
            raise ConfigError("noise.time: D3PM's ELBO has T steps; set noise.time=discrete (model.kind=d3pm)")
        if not self.noise.carry_over and kind != "mdlm":
            raise ConfigError(f"noise.carry_over: the carry-over ablation is MDLM's (model.kind=mdlm), not {kind!r}")
        if self.noise.aux_ce_weight and kind != "d3pm":
            raise ConfigError(f"noise.aux_ce_weight: only D3PM (model.kind=d3pm) has an auxiliary loss, not {kind!r}")
        if kind in KIND_SAMPLERS and self.sampling.sampler not in KIND_SAMPLERS[kind]:
            raise ConfigError(f"sampling.sampler: {self.sampling.sampler!r} does not apply to model.kind={kind}; "
                              f"choose one of {', '.join(KIND_SAMPLERS[kind])}")
        # A model trained from this config has max_seq_len = data.block_size (mdlm.data.spec).
        block = self.data.block_size
        if self.sampling.length is not None and self.sampling.stride is None and self.sampling.length > block:
            raise ConfigError(f"sampling.length: {self.sampling.length} exceeds data.block_size {block} (the "
                              "model's max_seq_len); set sampling.stride for semi-autoregressive generation")
        if self.sampling.stride is not None and self.sampling.stride >= block:
            raise ConfigError(f"sampling.stride: {self.sampling.stride} must be below data.block_size {block} "
                              "(the model's max_seq_len)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every section as plain data (YAML- and JSON-safe)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def flat(self) -> dict[str, Any]:
        """``{'model.hidden_size': 512, ...}`` for the training sections, e.g. for experiment-tracker params."""
        return {f"{section}.{key}": value for section in TRAINING_SECTIONS
                for key, value in _plain(getattr(self, section)).items()}


def _plain(section: Any) -> dict[str, Any]:
    return section.model_dump() if isinstance(section, BaseModel) else asdict(section)


def check_positive(obj: Any, prefix: str, *names: str) -> None:
    """ConfigError naming ``prefix.name`` (or ``name`` when the prefix is empty) unless each value is > 0."""
    for name in names:
        value = getattr(obj, name)
        if not value > 0:  # also rejects NaN
            raise ConfigError(f"{prefix}.{name}: must be > 0, got {value}" if prefix else
                              f"{name}: must be > 0, got {value}")


# ---------------------------------------------------------------------------------------------------------
# Building a config from dicts, presets and overrides, with type checking.


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` as ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is list:
        if isinstance(value, str):  # `eval.data=DIR` on a command line: one item
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {annotation!r}")


def _section_from_dict(cls: type, data: dict[str, Any], prefix: str, base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    values = {} if base is None else {f.name: getattr(base, f.name) for f in fields(cls)}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            near = f"{prefix}.{hint[0]}" if hint and prefix else (hint[0] if hint else None)
            raise ConfigError(f"unknown config key '{full}'" + (f" (did you mean '{near}'?)" if near else ""))
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _section_from_dict(hints[key], value, full, values.get(key))
        elif isinstance(hints[key], type) and issubclass(hints[key], BaseModel):
            values[key] = model_from_dict(hints[key], value, full, values.get(key))
        else:
            values[key] = _coerce(value, hints[key], full)
    return cls(**values)


def dataclass_from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build any config dataclass from a dict with the same key and type checks as the main tree."""
    return _section_from_dict(cls, data or {}, prefix)


def config_from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Merge ``data`` (nested dict) over ``base`` (defaults if None); check keys and types."""
    return _section_from_dict(Config, data or {}, "", base or Config())


def parse_override(text: str) -> dict[str, Any]:
    """``'model.hidden_size=256'`` -> ``{'model': {'hidden_size': 256}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form a.b=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_preset(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a preset by name (``mdlm/presets/NAME.yaml``) or by file path; ``base:`` chains presets
    (a relative ``base:`` path is resolved next to the file that names it)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset '{name_or_path}'; available: {', '.join(preset_names())}")
    elif not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base:' chain loops back to this file")
    parent = data.pop("base", None)
    if parent is None:
        return data
    parent_path = Path(str(parent))
    if parent_path.suffix and not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    return _deep_merge(read_preset(parent_path if parent_path.suffix else str(parent), (*_seen, path)), data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then ``preset`` (name or YAML path), then ``a.b=value`` overrides; validated."""
    data: dict[str, Any] = read_preset(preset) if preset else {}
    for text in overrides:
        data = _deep_merge(data, parse_override(text))
    return config_from_dict(data).validate()


def model_config_for(size: str, **changes: Any) -> ModelConfig:
    """A ``ModelConfig`` of a named size (cpu, tiny, small, medium) with optional field changes."""
    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown model size '{size}'; available: {', '.join(MODEL_SIZES)}")
    config = _section_from_dict(ModelConfig, {**MODEL_SIZES[size], **changes}, "model")
    config.validate()
    return config

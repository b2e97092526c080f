"""Settings of the sampler service: which model, where it listens, batching, replicas and request limits.

Built from the Serve config's ``args`` (or ``pipelines/serve.py`` overrides) with the same checks as the
training config: unknown keys and wrong types are rejected with the key named.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Literal

import yaml

from mdlm.config import ConfigError, SamplerName, check_positive, dataclass_from_dict


@dataclass
class ServeConfig:
    """Everything ``build_app`` takes. Limits bound every request so no request can exhaust a replica."""

    model: str = ""  # local dir, fsspec URL, models:/NAME@ALIAS or runs:/RUN_ID/model
    device: Literal["cpu", "cuda"] = "cpu"
    host: str = "127.0.0.1"  # used by pipelines/serve.py; a Serve config sets http_options itself
    port: int = 8000
    tracking_uri: str | None = None  # for models:/ and runs:/ URIs; default MLFLOW_TRACKING_URI or runs/mlflow.db
    served_model_name: str | None = None  # the id OpenAI clients name (GET /v1/models); default the model kind
    # Replicas and dynamic batching.
    num_replicas: int = 1
    autoscaling: bool = False  # when true, replicas scale between min_replicas and max_replicas
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # 0 with device=cuda means 1
    torch_threads: int | None = None
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.05
    # Request limits.
    max_num_samples: int = 16
    max_length: int | None = None  # None: 4 x the model's max_seq_len (semi-autoregressive beyond one block)
    max_steps: int = 10000
    max_prompt_chars: int = 8000
    max_texts: int = 32
    max_text_chars: int = 20000
    max_mc_samples: int = 64
    max_body_bytes: int = 262144
    max_stream_frames: int = 128
    default_sampler: SamplerName = "cached"

    def validate(self) -> ServeConfig:
        if not self.model:
            raise ConfigError("model: required (a model directory, fsspec URL or models:/NAME@ALIAS)")
        check_positive(self, "", "port", "num_replicas", "min_replicas", "max_replicas", "max_batch_size",
                  "max_num_samples", "max_steps", "max_prompt_chars", "max_texts", "max_text_chars", "max_mc_samples",
                  "max_body_bytes", "max_stream_frames", "num_cpus", "target_ongoing_requests")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: {self.port} is not a TCP port")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("served_model_name: must not be blank (leave it unset for the model kind)")
        for name in ("max_length", "torch_threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be > 0, got {value}")
        if self.num_gpus < 0 or self.batch_wait_timeout_s < 0:
            raise ConfigError("num_gpus and batch_wait_timeout_s must be >= 0")
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        return self

    @property
    def max_ongoing_requests(self) -> int:
        """Requests a replica accepts at once: at least a full batch (else batches never fill) plus streams."""
        return 2 * self.max_batch_size + 8

    def deployment_options(self) -> dict[str, Any]:
        """``Deployment.options(...)`` for these settings."""
        gpus = self.num_gpus or (1.0 if self.device == "cuda" else 0.0)
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": gpus},
        }
        if self.autoscaling:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": self.target_ongoing_requests}
        else:
            options["num_replicas"] = self.num_replicas
        return options

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TEXT_FIELDS = ("model", "host", "tracking_uri", "device", "default_sampler", "served_model_name")


def serve_config_from_dict(args: dict[str, Any] | None) -> ServeConfig:
    """Settings from a Serve config's ``args`` mapping (or parsed overrides); raises ConfigError.

    ``serve run mdlm.serve.app:build_app max_batch_size=32`` passes every value as a string: values of
    non-text settings are read as YAML scalars first."""
    values = {}
    for key, value in dict(args or {}).items():
        if isinstance(value, str) and key not in _TEXT_FIELDS:
            with contextlib.suppress(yaml.YAMLError):  # if unreadable, the type check below names the key
                value = yaml.safe_load(value)
        values[key] = value
    return dataclass_from_dict(ServeConfig, values).validate()

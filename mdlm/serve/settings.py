"""Settings of the sampler service: which model, where it listens, batching, replicas and request limits.

``ServeConfig`` is a pydantic model, so Ray Serve's typed application builder validates it itself:
``serve run mdlm.serve.app:build_app model=... max_batch_size=32`` (strings are coerced to the field types) or a
Serve config's ``args``. In the config tree it is the ``serve`` section (``mdlm serve serve.port=8001``).
Unknown keys and wrong values are rejected with the key named.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mdlm.config_base import SamplerName, model_from_dict

_NULLS = ("null", "none", "~", "")  # how `key=value` command lines spell "unset" for an optional setting


class ServeConfig(BaseModel):
    """Everything ``build_app`` takes. Limits bound every request so no request can exhaust a replica."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    model: str = Field("models:/mdlm@current", min_length=1)  # dir, fsspec URL, models:/NAME@ALIAS, runs:/ID/model
    device: Literal["cpu", "cuda"] = "cpu"
    host: str = "127.0.0.1"  # used by `mdlm serve`; a Serve config sets http_options itself
    port: int = Field(8000, gt=0, lt=65536)
    app_name: str = Field("mdlm", min_length=1)  # the Serve application's name (`mdlm serve`)
    tracking_uri: str | None = None  # for models:/ and runs:/ URIs; default MLFLOW_TRACKING_URI or runs/mlflow.db
    served_model_name: str | None = None  # the id OpenAI clients name (GET /v1/models); default the model kind
    # Replicas and dynamic batching.
    num_replicas: int = Field(1, gt=0)
    autoscaling: bool = False  # when true, replicas scale between min_replicas and max_replicas
    min_replicas: int = Field(1, gt=0)
    max_replicas: int = Field(4, gt=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)  # 0 with device=cuda means 1
    torch_threads: int | None = Field(None, gt=0)
    max_batch_size: int = Field(16, gt=0)  # requests per batched call (score; generate with batching=request)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    # continuous: a diffusion model's generate requests share forward passes at step granularity
    # (mdlm.serve.continuous); request: only identical unseeded requests share one sampler call.
    batching: Literal["continuous", "request"] = "continuous"
    max_batch_rows: int = Field(64, gt=0)  # continuous: rows per forward pass
    step_wait_s: float = Field(0.01, ge=0)  # continuous: how long a pass waits for running requests' next step
    # Request limits.
    max_num_samples: int = Field(16, gt=0)
    max_length: int | None = Field(None, gt=0)  # None: 4 x the model's max_seq_len (semi-autoregressive beyond)
    max_steps: int = Field(10000, gt=0)
    max_prompt_chars: int = Field(8000, gt=0)
    max_texts: int = Field(32, gt=0)
    max_text_chars: int = Field(20000, gt=0)
    max_mc_samples: int = Field(64, gt=0)
    max_body_bytes: int = Field(262144, gt=0)  # enforced by mdlm.serve.app.BodyLimit (FastAPI has no body limit)
    max_stream_frames: int = Field(128, gt=0)
    default_sampler: SamplerName = "cached"

    @field_validator("tracking_uri", "served_model_name", "torch_threads", "max_length", mode="before")
    @classmethod
    def _unset(cls, value: Any) -> Any:
        """``max_length=null`` on a command line arrives as the string 'null': it means unset."""
        return None if isinstance(value, str) and value.strip().lower() in _NULLS else value

    @field_validator("served_model_name")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank (leave it unset for the model kind)")
        return value

    @model_validator(mode="after")
    def _replica_range(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        if self.batching == "continuous" and self.max_batch_rows < self.max_num_samples:
            raise ValueError(f"max_batch_rows {self.max_batch_rows} is below max_num_samples {self.max_num_samples}: "
                             "a request's rows must fit one forward pass")
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
        return self.model_dump()


def serve_config_from_dict(args: dict[str, Any] | None, prefix: str = "",
                           base: ServeConfig | None = None) -> ServeConfig:
    """Settings from a mapping (a Serve config's ``args``, parsed overrides, a preset's ``serve:``) over ``base``;
    raises ConfigError naming the key."""
    return model_from_dict(ServeConfig, args, prefix, base)

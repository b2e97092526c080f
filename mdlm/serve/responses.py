"""Response bodies of the service's own endpoints, so that ``/openapi.json`` describes what each one returns.

The engine builds plain dicts; FastAPI checks them against these models and leaves out fields a response does
not set (``tokens`` unless asked for), so the JSON is exactly the engine's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Discriminator, Field


class ErrorDetail(BaseModel):
    field: str = Field(description="the request field at fault (``body`` for the body as a whole)")
    message: str
    errors: list[dict[str, str | None]] | None = Field(default=None, description="every validation error")


class ErrorResponse(BaseModel):
    """Every 4xx of the service's own endpoints."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Limits(BaseModel):
    max_num_samples: int
    max_length: int
    max_steps: int
    max_prompt_chars: int
    max_texts: int
    max_text_chars: int
    max_mc_samples: int
    max_body_bytes: int
    max_batch_size: int


class ModelInfo(BaseModel):
    """GET /v1/model: the served model, its tokenizer's mask token and the request limits."""

    id: str = Field(description="the model name the OpenAI-compatible endpoints answer to")
    source: str
    model_type: str
    parameters: int
    max_seq_len: int
    vocab_size: int
    mask_token: str | None
    device: str
    samplers: list[str]
    default_sampler: str
    noise_schedule: str | None
    limits: Limits


class Sample(BaseModel):
    text: str
    tokens: list[int] | None = Field(default=None, description="token ids, with return_tokens")


class BatchInfo(BaseModel):
    requests: int = Field(description="requests that shared this sampler call (continuous batching: the most that "
                                      "shared one of its forward passes)")
    rows: int = Field(description="rows of the sampler call (continuous batching: this request's rows)")
    seconds: float
    mode: Literal["continuous"] | None = Field(None, description="set with continuous batching")
    mean_requests_per_pass: float | None = Field(None, description="continuous: requests per forward pass, mean over "
                                                                   "this request's passes")
    mean_rows_per_pass: float | None = Field(None, description="continuous: rows per forward pass, mean over this "
                                                               "request's passes")


class GenerateResponse(BaseModel):
    """POST /v1/generate."""

    samples: list[Sample]
    sampler: str
    steps: int
    length: int
    num_forward_passes: int
    batch: BatchInfo


class StateFrame(BaseModel):
    """A denoising state: per sample the token texts, null where a position is still masked."""

    type: Literal["state"]
    step: int
    steps: int
    masked: int
    samples: list[list[str | None]]


class DoneFrame(GenerateResponse):
    """The last line of a stream: the finished samples."""

    type: Literal["done"]


class ErrorFrame(BaseModel):
    """A failure after the stream started."""

    type: Literal["error"]
    message: str


StreamFrame = Annotated[StateFrame | DoneFrame | ErrorFrame, Discriminator("type")]
"""One line of POST /v1/generate/stream (NDJSON)."""


class TextScore(BaseModel):
    num_tokens: int
    nelbo: float = Field(description="per-token NELBO in nats (the exact NLL for the AR model)")
    perplexity_bound: float | None = Field(description="exp(nelbo); null where it overflows")
    std_error: float | None = Field(description="standard error over the Monte-Carlo samples (null for one)")


class ScoreResponse(BaseModel):
    """POST /v1/score."""

    results: list[TextScore]
    mc_samples: int
    batch_requests: int
    bound: str

"""Request and response bodies of the OpenAI-compatible endpoints (``GET /v1/models``, ``POST /v1/completions``).

The fields follow OpenAI's legacy Completions API; ``steps`` and ``sampler`` are this service's extensions (the
``openai`` client sends them through ``extra_body``). Other OpenAI fields (``temperature``, ``logprobs``,
``echo``, ``suffix``, ...) are rejected by name rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from mdlm.config import SamplerName
from mdlm.serve.schemas import Text, check_unicode

FinishReason = Literal["stop", "length"]
MAX_STOP = 4  # OpenAI's limit on stop sequences


def _listed(value: Any) -> Any:
    """A lone string is a list of one (``prompt`` and ``stop`` take either). It is checked here, so that its
    errors name the field (``prompt``); those of a list's items name the item (``prompt[1]``)."""
    if isinstance(value, str):
        return [check_unicode(value)]
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of strings")
    if value and all(isinstance(v, (int, list)) for v in value):
        raise ValueError("token-id prompts are not supported: send text")
    return value


def _non_empty(value: Any) -> Any:
    if value == "":
        raise ValueError("must not be empty")
    return value


_STRINGS_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
Prompts = Annotated[list[Text], BeforeValidator(_listed), WithJsonSchema(_STRINGS_SCHEMA)]
_Stop = Annotated[str, Field(min_length=1), AfterValidator(check_unicode)]
Stops = Annotated[list[_Stop], BeforeValidator(_listed), BeforeValidator(_non_empty), WithJsonSchema(_STRINGS_SCHEMA)]


class CompletionRequest(BaseModel):
    """POST /v1/completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text = Field(description="the served model's id (GET /v1/models)")
    prompt: Prompts | None = Field(default=None, min_length=1,
                                   description="a text or a list of texts to continue (none: unconditional)")
    max_tokens: int | None = Field(default=16, ge=1, description="tokens generated after each prompt")
    n: int | None = Field(default=1, ge=1, description="completions per prompt")
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="same seed, same request: same text")
    stop: Stops | None = Field(default=None, max_length=MAX_STOP,
                               description=f"up to {MAX_STOP} strings; the text ends before the first one")
    stream: bool | None = Field(default=False, description="server-sent events, one chunk per choice")
    steps: int | None = Field(default=None, ge=1, description="extension: denoising steps (default max_tokens)")
    sampler: SamplerName | None = Field(default=None, description="extension: the diffusion sampler")


class CompletionChoice(BaseModel):
    text: str
    index: int = Field(description="prompt index x n + completion index")
    finish_reason: FinishReason = Field(description="stop: a stop string ended the text; length: max_tokens")
    logprobs: None = None


class CompletionUsage(BaseModel):
    """Tokens of the prompts and of the returned texts, counted with the model's tokenizer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """The response of POST /v1/completions, and (with ``usage`` null) each chunk of its stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """GET /v1/models: the one model this application serves."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """Every 4xx of the OpenAI-compatible endpoints (OpenAI's error shape)."""

    error: OpenAIErrorDetail

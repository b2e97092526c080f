"""Request bodies of the sampler service, and the error every bad request gets.

Pydantic checks types and fixed ranges (extra fields are rejected); ``engine`` checks the limits that
depend on the settings and the model, raising ``RequestError`` that names the field. Either becomes an
HTTP 4xx with ``{"error": {"field": ..., "message": ...}}``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from mdlm.config import SamplerName


class RequestError(ValueError):
    """A request value the service cannot honour; ``field`` names it in the response (``code``: OpenAI's)."""

    def __init__(self, field: str, message: str, status: int = 422, code: str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status
        self.code = code


def check_unicode(text: str) -> str:
    """Reject text that is not valid Unicode. JSON's ``\\ud800`` escape (or its raw bytes) decodes to an
    unpaired surrogate, which no tokenizer can encode: the field gets a 4xx instead of the model a crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode: unpaired surrogate U+{ord(text[exc.start]):04X} at character "
                         f"{exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(check_unicode)]
"""A string field of a request body: valid Unicode (every text a client sends is declared with it)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateRequest(_Strict):
    """POST /v1/generate and /v1/generate/stream."""

    prompt: Text | None = Field(default=None, description="text the samples continue (kept as their prefix)")
    infill: Text | None = Field(default=None, description="text with the model's mask token where text goes")
    num_samples: int = Field(default=1, ge=1)
    length: int | None = Field(default=None, ge=1, description="total tokens per sample (default: one block)")
    steps: int | None = Field(default=None, ge=1, description="denoising steps (default: tokens to generate)")
    sampler: SamplerName | None = None
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stride: int | None = Field(default=None, ge=1, description="new tokens per round beyond one block")
    return_tokens: bool = False


class ScoreRequest(_Strict):
    """POST /v1/score: the NELBO (an upper bound on the NLL) of each text."""

    texts: list[Text] = Field(min_length=1)
    mc_samples: int = Field(default=8, ge=1, description="Monte-Carlo time samples per block")
    seed: int = Field(default=0, ge=0, lt=2**63)

"""What every config section shares, wherever it is defined: the names (model kinds, schedules, samplers and
which kind takes which), ``ConfigError``, and how a pydantic section's errors read. Nothing from mdlm is imported
here, so sections in other packages (``mdlm.serve.settings``) can use it and :mod:`mdlm.config` can hold them."""

from __future__ import annotations

import difflib
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config key, value or file is invalid; the message names it."""


ScheduleName = Literal["loglinear", "linear", "cosine", "cosinesqr", "geometric"]
ModelKind = Literal["mdlm", "sedd", "d3pm", "ar"]
MODEL_KINDS: tuple[str, ...] = typing.get_args(ModelKind)
DIFFUSION_KINDS = ("mdlm", "sedd", "d3pm")  # masked diffusion models: a [MASK] token, a noise schedule, samplers
SamplerName = Literal["ancestral", "cached", "first_hitting", "euler", "confidence", "confidence_k", "remdm"]
SAMPLERS: tuple[str, ...] = typing.get_args(SamplerName)  # the diffusion samplers (mdlm.sampling)
# Which samplers each kind takes: 'euler' is SEDD's Euler step; D3PM's model may keep a position masked, which
# the first-hitting sampler (exact for MDLM's process) does not allow for. 'confidence' / 'confidence_k'
# (parallel decoding) and 'remdm' (remasking, derived from MDLM's SUBS posterior) are MDLM's.
KIND_SAMPLERS: dict[str, tuple[str, ...]] = {"mdlm": ("ancestral", "cached", "first_hitting", "confidence",
                                                      "confidence_k", "remdm"),
                                             "sedd": ("ancestral", "cached", "first_hitting", "euler"),
                                             "d3pm": ("ancestral", "cached")}
RemaskSchedule = Literal["cap", "rescale"]  # ReMDM's sigma_t schedules (mdlm.diffusion.remdm)
REMASK_SCHEDULES: tuple[str, ...] = typing.get_args(RemaskSchedule)


def describe_validation_error(exc: ValidationError, prefix: str = "", fields: Any = ()) -> str:
    """pydantic's first error as ``prefix.key: message`` (an unknown key gets a 'did you mean')."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    full = f"{prefix}.{key}" if prefix and key else (key or prefix)
    if error["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(key, sorted(fields), n=1)
        near = f"{prefix}.{hint[0]}" if hint and prefix else (hint[0] if hint else "")
        return f"unknown config key '{full}'" + (f" (did you mean '{near}'?)" if near else "")
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a model-level check (e.g. the replica range) names its keys itself
        return f"{prefix}: {message}" if prefix else message
    return f"{full}: {message}, got {error['input']!r}" if "input" in error else f"{full}: {message}"


def model_from_dict(cls: type[BaseModel], data: Any, prefix: str = "", base: BaseModel | None = None) -> Any:
    """A pydantic section from a mapping merged over ``base``; ConfigError naming ``prefix.key`` if invalid."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    values = {**(base.model_dump(exclude_unset=True) if base is not None else {}), **(data or {})}
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, prefix, cls.model_fields)) from None

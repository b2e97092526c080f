"""Error responses: every bad request gets a 4xx whose JSON names the field, in the shape its API uses.

The service's own endpoints answer ``{"error": {"field", "message"}}`` (422 for a bad value); the
OpenAI-compatible ones (``/v1/models``, ``/v1/completions``) answer OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with 400 for a bad value, so OpenAI's client libraries
raise their usual errors (``BadRequestError``, ``NotFoundError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import Scope

OPENAI_PATHS = ("/v1/models", "/v1/completions")
_MAX_ECHO = 200  # characters of a client's value an error message repeats at most


def printable(text: str, limit: int = _MAX_ECHO) -> str:
    """``text`` safe to put into a UTF-8 response: unpaired surrogates shown as ``\\udXXX``, cut at ``limit``."""
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return safe if len(safe) <= limit else safe[:limit] + "..."


def field_name(loc: Sequence[Any]) -> str:
    """A pydantic error location as the field a client wrote: ``texts[1]``, ``prompt``; ``body`` for the whole."""
    text = ""
    for part in (p for p in loc if p != "body"):
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{printable(str(part))}" if text else printable(str(part))
    return text or "body"


def validation_message(error: dict[str, Any]) -> str:
    """The message of one pydantic error, in the client's terms."""
    kind = error.get("type")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "string_unicode":  # pydantic's own check; with no location, a key was at fault
        where = "" if error.get("loc") else "holds a key that "
        return f"{where}is not valid Unicode (an unpaired surrogate)"
    return str(error.get("msg", "invalid value"))


def route_path(scope: Scope) -> str:
    """The request's path below the application's route prefix (Serve sets the prefix as ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def is_openai(scope: Scope) -> bool:
    """Whether the request went to one of the OpenAI-compatible endpoints."""
    return route_path(scope).rstrip("/") in OPENAI_PATHS


def error_response(scope: Scope, status: int, field: str, message: str, code: str | None = None,
                   errors: list[dict[str, str]] | None = None) -> JSONResponse:
    """The error JSON for ``scope``'s API: OpenAI's shape on its endpoints (a 422 becomes its 400), else ours."""
    field, message = printable(field), printable(message, 4 * _MAX_ECHO)
    if is_openai(scope):
        detail = {"message": f"{field}: {message}", "type": "invalid_request_error", "param": field, "code": code}
        return JSONResponse({"error": detail}, status_code=400 if status == 422 else status)
    body: dict[str, Any] = {"field": field, "message": message}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse({"error": body}, status_code=status)

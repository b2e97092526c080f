"""The Ray Serve application: FastAPI ingress, dynamic batching, streaming and the denoising page.

    serve run mdlm.serve.app:build_app model=runs/ray/cpu-demo/model      # or a Serve config YAML
    mdlm serve serve.model=models:/mdlm@current                          # or python pipelines/serve.py

Endpoints: ``GET /`` (page), ``GET /v1/health``, ``GET /v1/model``, ``POST /v1/generate``,
``POST /v1/generate/stream`` (NDJSON states while tokens unmask), ``POST /v1/score``, and OpenAI's
``GET /v1/models`` and ``POST /v1/completions`` (``openai_api``). Every bad request gets a 4xx naming the
field (``errors``); nothing a client sends reaches the model unchecked.
"""


import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mdlm.serve import openai_api
from mdlm.serve.engine import Cancelled, Engine, GenerateJob
from mdlm.serve.errors import error_response, field_name, validation_message
from mdlm.serve.openai_schemas import Completion, CompletionRequest, ModelList, OpenAIErrorResponse
from mdlm.serve.responses import ErrorResponse, GenerateResponse, Health, ModelInfo, ScoreResponse, StreamFrame
from mdlm.serve.schemas import GenerateRequest, RequestError, ScoreRequest
from mdlm.serve.settings import ServeConfig, serve_config_from_dict
from mdlm.storage import is_mlflow_uri, is_url

logger = logging.getLogger("ray.serve")

_BODY_LIMIT = {"bytes": ServeConfig.model_fields["max_body_bytes"].default}  # set per replica from its settings


def set_body_limit(limit: int) -> None:
    """Set this process's request body limit. (A function, not an assignment in the deployment: Serve ships
    the deployment class by value, so a module global it touches directly would be a copy.)"""
    _BODY_LIMIT["bytes"] = limit


class BodyLimit:
    """ASGI middleware: read the whole body first; over the limit -> 413 before any handler runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _BODY_LIMIT["bytes"]
        too_big = error_response(scope, 413, "body", f"request body exceeds {limit} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_big(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await too_big(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server's receive does

        await self.app(scope, replay, send)


class NDJSONResponse(StreamingResponse):
    media_type = "application/x-ndjson"


class EventStreamResponse(StreamingResponse):
    """Server-sent events (what OpenAI's clients read when ``stream`` is true)."""

    media_type = "text/event-stream"


api = FastAPI(title="mdlm sampler", description="Masked diffusion language model: generate, stream, score; "
              "OpenAI-compatible completions.")
api.add_middleware(BodyLimit)
_ERRORS: dict[int | str, dict[str, Any]] = {422: {"model": ErrorResponse, "description": "a bad request value"},
                                            400: {"model": ErrorResponse, "description": "malformed body"},
                                            413: {"model": ErrorResponse, "description": "body too large"}}
_OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorResponse, "description": "a bad request value or body"},
    404: {"model": OpenAIErrorResponse, "description": "no such model"},
    413: {"model": OpenAIErrorResponse, "description": "body too large"}}


def _openapi() -> dict[str, Any]:
    """FastAPI's schema, with the NDJSON stream's frames under its own media type instead of JSON, and no 422
    on the OpenAI endpoint (its bad values get OpenAI's 400)."""
    if api.openapi_schema is None:
        paths = FastAPI.openapi(api)["paths"]
        content = paths["/v1/generate/stream"]["post"]["responses"]["200"]["content"]
        content[NDJSONResponse.media_type] = content.pop("application/json")
        paths["/v1/completions"]["post"]["responses"].pop("422", None)
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(request.scope, 400, "body",
                              f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    listed = [{"field": field_name(e.get("loc", ())), "message": validation_message(e)} for e in errors or [first]]
    return error_response(request.scope, 422, listed[0]["field"], listed[0]["message"], errors=listed)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(request.scope, exc.status, exc.field, exc.message, code=exc.code)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own 4xx (a body it cannot parse, no such route, wrong method) in the same error shape."""
    if isinstance(exc.__cause__, UnicodeDecodeError):
        cause = exc.__cause__
        message = f"is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    else:
        message = str(exc.detail)
    field = {404: "path", 405: "method"}.get(exc.status_code, "body")
    response = error_response(request.scope, exc.status_code, field, message)
    response.headers.update(exc.headers or {})
    return response


def _page() -> str:
    return resources.files("mdlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")


@serve.deployment(name="MDLMService")
@serve.ingress(api)
class MDLMService:
    """One replica: the model in memory, an engine around it, batched generate and score calls."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from mdlm.modeling import load_pretrained

        self.settings = serve_config_from_dict(settings)
        set_body_limit(self.settings.max_body_bytes)
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if self.settings.tracking_uri:
            os.environ.setdefault("MLFLOW_TRACKING_URI", self.settings.tracking_uri)
        device = self.settings.device
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device=cuda but this replica sees no GPU (set num_gpus, or device=cpu)")
        model = load_pretrained(self.settings.model, map_location=device)
        self.engine = Engine(model, self.settings, source=self.settings.model)
        # continuous batching: one thread per running request (each runs its own sampler; mdlm.serve.continuous)
        self._pool = ThreadPoolExecutor(max_workers=self.settings.max_ongoing_requests, thread_name_prefix="mdlm-gen")
        for batched in (self._generate_batch, self._score_batch):
            batched.set_max_batch_size(self.settings.max_batch_size)
            batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self._page = _page()
        logger.info("mdlm: serving %s (%s) on %s", self.settings.model, model.model_type, device)

    async def _generate(self, job: GenerateJob) -> dict[str, Any]:
        """One generate job: continuous batching where it applies, else Serve's request batching."""
        if self.engine.continuous(job):
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.run_continuous, job)
        return await self._generate_batch(job)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, jobs: list[GenerateJob]) -> list[dict[str, Any]]:
        # The event loop stays free (health checks, queueing the next batch) while torch works in a thread.
        return await asyncio.to_thread(self.engine.run_generate, jobs)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _score_batch(self, requests: list[ScoreRequest]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.engine.score_many, requests)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page)

    @api.get("/v1/health", response_model=Health)
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model", response_model=ModelInfo)
    async def model_info(self) -> dict[str, Any]:
        return self.engine.info()

    @api.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_unset=True,
              responses=_ERRORS)
    async def generate(self, body: GenerateRequest) -> dict[str, Any]:
        return await self._generate(self.engine.plan_generate(body))

    @api.post("/v1/generate/stream", response_model=StreamFrame, responses={
        200: {"description": "NDJSON: one StreamFrame per line (states while tokens unmask), the last one done "
                             "(or error)"}, **_ERRORS})
    async def generate_stream(self, body: GenerateRequest) -> StreamingResponse:
        job = self.engine.plan_generate(body)
        if not self.engine.is_diffusion:
            raise RequestError("sampler", "streaming denoising states needs a masked diffusion model")
        return NDJSONResponse(self._stream_lines(job))

    async def _stream_lines(self, job: GenerateJob) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        stop = threading.Event()

        def emit(frame: dict[str, Any] | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, frame)

        def work() -> None:
            try:
                emit(self.engine.stream(job, emit, stop.is_set))
            except Cancelled:
                pass
            except Exception as exc:  # the stream has started: report in-band, keep the replica alive
                logger.exception("mdlm: stream failed")
                emit({"type": "error", "message": str(exc)})
            finally:
                emit(None)

        worker = loop.run_in_executor(self._pool, work)
        try:
            while (frame := await queue.get()) is not None:
                yield json.dumps(frame) + "\n"
        finally:
            stop.set()  # client gone or stream finished: the sampler stops at its next step
            await asyncio.shield(worker)

    @api.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS)
    async def score(self, body: ScoreRequest) -> dict[str, Any]:
        self.engine.plan_score(body)  # limits first: a bad request never joins a batch
        return await self._score_batch(body)

    # OpenAI-compatible endpoints (openai_api): the same engine, batching and limits as /v1/generate.

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return openai_api.model_list(self.engine)

    @api.post("/v1/completions", response_model=Completion, responses={
        200: {"description": "a completion; with stream: server-sent events, each `data:` a Completion chunk "
                             "(one per choice), then `data: [DONE]`",
              "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/Completion"}}}},
        **_OPENAI_ERRORS})
    async def completions(self, body: CompletionRequest) -> Completion | EventStreamResponse:
        plan = openai_api.plan_completion(body, self.engine)
        if body.stream:
            return EventStreamResponse(self._completion_events(plan), headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(*(self._generate(job) for job in plan.jobs))
        return openai_api.completion(plan, results, self.engine)

    async def _completion_events(self, plan: openai_api.CompletionPlan) -> AsyncIterator[str]:
        """The finished text of each choice as one event, in order (diffusion writes a text all at once)."""
        tasks = [asyncio.ensure_future(self._generate(job)) for job in plan.jobs]
        try:
            for i, task in enumerate(tasks):
                for choice in openai_api.choices(plan, i, await task, self.engine):
                    yield openai_api.sse_event(openai_api.chunk(plan, choice))
            yield openai_api.SSE_DONE
        except Exception as exc:  # the stream has started: report in-band, keep the replica alive
            logger.exception("mdlm: completion stream failed")
            yield openai_api.sse_event(openai_api.stream_error(str(exc)))
        finally:
            for task in tasks:
                task.cancel()


def _absolute_model(model: str) -> str:
    """Replicas may run in another working directory: make an existing local path absolute."""
    if is_url(model) or is_mlflow_uri(model):
        return model
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model: directory not found: {model} (train one with pipelines/train.py, or give "
                                "models:/NAME@ALIAS)")
    return str(path.absolute())


def build_app(args: ServeConfig) -> serve.Application:
    """Serve's typed application builder: ``serve run mdlm.serve.app:build_app model=... max_batch_size=32`` or a
    Serve config's ``args`` arrive validated as :class:`ServeConfig` (Serve calls ``ServeConfig.model_validate``);
    a plain mapping from Python is validated here the same way."""
    settings = args.model_copy() if isinstance(args, ServeConfig) else serve_config_from_dict(args)
    settings.model = _absolute_model(settings.model)
    if settings.tracking_uri is None and is_mlflow_uri(settings.model):
        from mdlm.tracking import default_tracking_uri

        settings.tracking_uri = default_tracking_uri("runs")
    return MDLMService.options(**settings.deployment_options()).bind(settings.to_dict())

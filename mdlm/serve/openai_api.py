"""OpenAI's Completions API on the service's engine: requests become generate jobs, results become choices.

A completion request is one ``GenerateRequest`` per prompt (``n`` samples, length = the prompt's tokens plus
``max_tokens``), planned by the same ``Engine.plan_generate`` as ``POST /v1/generate``, so it meets the same
limits and checks; an error it raises is renamed to the OpenAI field the client sent (``length`` ->
``max_tokens``, ``num_samples`` -> ``n``). The app then runs the jobs through the same batched engine call.

Diffusion produces the whole completion at once, so a stream (``stream: true``) carries the finished text of
each choice as one server-sent event, in choice order, then ``data: [DONE]``: the framing OpenAI's clients parse.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mdlm.serve.engine import Engine, GenerateJob
from mdlm.serve.openai_schemas import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionUsage,
    FinishReason,
    ModelCard,
    ModelList,
)
from mdlm.serve.schemas import GenerateRequest, RequestError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
SSE_DONE = "data: [DONE]\n\n"
_RENAMED = {"length": "max_tokens", "num_samples": "n"}


@dataclass
class CompletionPlan:
    """A checked completion request: one generate job per prompt, and what turns results into choices."""

    id: str
    created: int
    model: str
    jobs: list[GenerateJob]
    prefix_lengths: list[int]  # token positions of each prompt in its samples (with BOS)
    prompt_tokens: int  # the prompts' tokens, counted with the model's tokenizer
    stops: list[str]


def model_list(engine: Engine) -> ModelList:
    """GET /v1/models: the served model's id."""
    return ModelList(data=[ModelCard(id=engine.model_id, created=engine.created, owned_by="mdlm")])


def plan_completion(req: CompletionRequest, engine: Engine) -> CompletionPlan:
    """Check ``req`` against the served model and the limits, and plan its jobs. Raises RequestError."""
    if req.model != engine.model_id:
        raise RequestError("model", f"the model {req.model!r} does not exist; this service serves "
                           f"{engine.model_id!r} (GET /v1/models)", status=404, code="model_not_found")
    prompts: Sequence[str | None] = req.prompt if req.prompt is not None else [None]
    n = req.n or 1
    limit = engine.settings.max_num_samples
    if n * len(prompts) > limit:
        field = "n" if len(prompts) == 1 else "prompt"
        raise RequestError(field, f"n x prompts = {n} x {len(prompts)} completions exceed the limit {limit}")
    max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
    jobs, prefix_lengths = [], []
    for i, prompt in enumerate(prompts):
        name = "prompt" if req.prompt is None or len(prompts) == 1 else f"prompt[{i}]"
        engine.check_prompt_chars(name, prompt)
        prefix = engine.prefix_length(prompt)
        if prefix < engine.block and prefix + max_tokens > engine.max_length:  # else the prompt is at fault
            raise RequestError("max_tokens", f"{max_tokens} tokens after the prompt's {prefix} exceed the limit of "
                               f"{engine.max_length} tokens per sample")
        body = GenerateRequest(prompt=prompt, num_samples=n, length=prefix + max_tokens, steps=req.steps,
                               sampler=req.sampler, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                               return_tokens=True)
        try:
            jobs.append(engine.plan_generate(body))
        except RequestError as exc:
            field = name if exc.field == "prompt" else _RENAMED.get(exc.field, exc.field)
            raise RequestError(field, exc.message, exc.status) from None
        prefix_lengths.append(prefix)
    prompt_tokens = sum(engine.count_tokens(p) for p in prompts if p)
    return CompletionPlan(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=engine.model_id,
                          jobs=jobs, prefix_lengths=prefix_lengths, prompt_tokens=prompt_tokens,
                          stops=list(req.stop or []))


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, FinishReason]:
    """``text`` up to (not including) the earliest occurrence of any stop string: finish "stop"; else all of
    it: finish "length" (a diffusion model always fills its max_tokens positions)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, "length")


def choices(plan: CompletionPlan, prompt_index: int, result: dict[str, Any], engine: Engine) -> list[CompletionChoice]:
    """The choices of one prompt from its generate result: the generated tokens' text, cut at a stop string."""
    n = plan.jobs[prompt_index].num_samples
    out = []
    for j, sample in enumerate(result["samples"]):
        text, finish = truncate_at_stop(engine.decode_ids(sample["tokens"][plan.prefix_lengths[prompt_index]:]),
                                        plan.stops)
        out.append(CompletionChoice(text=text, index=prompt_index * n + j, finish_reason=finish))
    return out


def completion(plan: CompletionPlan, results: Sequence[dict[str, Any]], engine: Engine) -> Completion:
    """The response: every prompt's choices in order, and the usage counted with the model's tokenizer."""
    listed = [choice for i, result in enumerate(results) for choice in choices(plan, i, result, engine)]
    completion_tokens = sum(engine.count_tokens(choice.text) for choice in listed)
    usage = CompletionUsage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=plan.prompt_tokens + completion_tokens)
    return Completion(id=plan.id, created=plan.created, model=plan.model, choices=listed, usage=usage)


def chunk(plan: CompletionPlan, choice: CompletionChoice) -> Completion:
    """One chunk of a stream: a completion object holding one choice, no usage."""
    return Completion(id=plan.id, created=plan.created, model=plan.model, choices=[choice])


def sse_event(payload: Completion | dict[str, Any]) -> str:
    """One server-sent event: ``data: {json}`` and the blank line that ends it."""
    data = payload.model_dump_json() if isinstance(payload, Completion) else json.dumps(payload)
    return f"data: {data}\n\n"


def stream_error(message: str) -> dict[str, Any]:
    """The in-band error of a stream that has started (OpenAI's clients raise it as an APIError)."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}

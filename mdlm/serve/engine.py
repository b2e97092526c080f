"""The model side of the service, free of Ray and HTTP: plan, batch, sample, stream and score.

``plan_generate`` turns a validated request body into a ``GenerateJob`` (token templates, resolved steps and
sampler) or raises ``RequestError`` naming the field. With ``batching="continuous"`` (the default) a diffusion
model's jobs each run through :meth:`Engine.run_continuous`, one thread per request, and share forward passes at
step granularity (:mod:`mdlm.serve.continuous`). ``run_generate`` (``batching="request"``, and the AR baseline,
whose KV-cached loop does not share passes) runs many jobs at once: jobs that can share one sampler call (same
sampler, steps, top-p and window length, no seed of their own) are stacked into one batch; each template row keeps
its own prompt or infill, since the samplers fill masked positions wherever they are.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mdlm.config import DIFFUSION_KINDS
from mdlm.eval.metrics import row_generators, safe_exp, sequence_nll
from mdlm.modeling import MDLM, ARModel
from mdlm.serve.continuous import ShareStats, StepBatcher
from mdlm.serve.schemas import GenerateRequest, RequestError, ScoreRequest
from mdlm.serve.settings import ServeConfig


class Cancelled(Exception):
    """Raised inside a sampler callback when the client of a stream went away."""


@dataclass
class GenerateJob:
    """One generate request, resolved against the model and the limits."""

    num_samples: int
    sampler: str
    steps: int
    top_p: float
    seed: int | None
    length: int
    template: Tensor | None = None  # [num_samples, L]: one window, masks where tokens are generated
    prefix: list[int] | None = None  # semi-autoregressive and AR generation
    stride: int | None = None
    return_tokens: bool = False
    kind: str = "window"  # window | semi_ar | ar

    def batch_key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys share one sampler call; None: runs alone (a seed or a multi-round sampler)."""
        if self.kind != "window" or self.seed is not None:
            return None
        return (self.sampler, self.steps, self.top_p, self.length)


@dataclass
class BatchStats:
    requests: int
    rows: int
    forward_passes: int
    seconds: float
    shared: ShareStats | None = None  # continuous batching: what the request's passes held


@dataclass
class _Group:
    key: tuple[Any, ...] | None
    jobs: list[tuple[int, GenerateJob]] = field(default_factory=list)


class Engine:
    """Holds the model and answers generate / stream / score calls (thread-safe for inference)."""

    def __init__(self, model: MDLM | ARModel, settings: ServeConfig, source: str = "") -> None:
        if model.tokenizer is None:
            raise ValueError(f"the model at {source or 'the given path'} has no tokenizer.json; the service "
                             "needs one to read and write text")
        self.model = model.eval()
        self.settings = settings
        self.source = source
        self.tokenizer = model.tokenizer
        self.config = model.config
        self.block = self.config.max_seq_len
        self.max_length = settings.max_length or (4 * self.block if self.is_diffusion else self.block)
        self.model_id = settings.served_model_name or self.model.model_type
        self.created = int(time.time())
        self._pieces: dict[int, str] = {}
        if self.is_diffusion and settings.default_sampler not in model.samplers:
            raise ValueError(f"default_sampler: {settings.default_sampler!r} does not apply to a {model.model_type} "
                             f"model; choose one of {', '.join(model.samplers)}")
        self.batcher: StepBatcher | None = None
        if self.is_diffusion and settings.batching == "continuous":
            self.batcher = StepBatcher(self._masked_backbone, pad_id=self.config.mask_token_id,
                                       max_rows=settings.max_batch_rows, wait_s=settings.step_wait_s)

    def _masked_backbone(self, z_t: Tensor, t: Tensor, keep: Tensor | None) -> Tensor:
        return self.model.backbone(z_t, t, keep)

    def continuous(self, job: GenerateJob) -> bool:
        """Whether ``job`` runs with continuous batching (:meth:`run_continuous`)."""
        return self.batcher is not None and job.kind != "ar"

    def run_continuous(self, job: GenerateJob) -> dict[str, Any]:
        """Run one job in the calling thread, sharing forward passes with the other running jobs."""
        assert self.batcher is not None
        started = time.perf_counter()
        with self.batcher.session() as (forward, shared):
            tokens, passes = self._run_group([job], forward=forward)
        stats = BatchStats(requests=shared.max_requests, rows=job.num_samples, forward_passes=passes,
                           seconds=time.perf_counter() - started, shared=shared)
        return self._result(job, tokens, stats)

    @property
    def is_diffusion(self) -> bool:
        return self.model.model_type in DIFFUSION_KINDS

    @property
    def mask_token(self) -> str | None:
        mask_id = self.config.mask_token_id
        return None if mask_id is None else self.tokenizer.id_to_token(mask_id)

    def info(self) -> dict[str, Any]:
        """What /v1/model reports: the model, its tokenizer's special tokens and the request limits."""
        s = self.settings
        return {
            "id": self.model_id,
            "source": self.source,
            "model_type": self.model.model_type,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "max_seq_len": self.block,
            "vocab_size": self.config.vocab_size,
            "mask_token": self.mask_token,
            "device": str(self.model.device),
            "samplers": list(self.model.samplers) if self.is_diffusion else ["autoregressive"],
            "default_sampler": s.default_sampler,
            "noise_schedule": getattr(self.model.noise_config, "schedule", None),
            "limits": {"max_num_samples": s.max_num_samples, "max_length": self.max_length,
                       "max_steps": s.max_steps, "max_prompt_chars": s.max_prompt_chars,
                       "max_texts": s.max_texts, "max_text_chars": s.max_text_chars,
                       "max_mc_samples": s.max_mc_samples, "max_body_bytes": s.max_body_bytes,
                       "max_batch_size": s.max_batch_size},
        }

    # ----------------------------------------------------------------------------------------------------
    # Generation

    def plan_generate(self, req: GenerateRequest) -> GenerateJob:
        """Check ``req`` against the limits and the model; resolve defaults. Raises RequestError."""
        s = self.settings
        if req.num_samples > s.max_num_samples:
            raise RequestError("num_samples", f"{req.num_samples} exceeds the limit {s.max_num_samples}")
        if req.steps is not None and req.steps > s.max_steps:
            raise RequestError("steps", f"{req.steps} exceeds the limit {s.max_steps}")
        for name in ("prompt", "infill"):
            self.check_prompt_chars(name, getattr(req, name))
        if req.prompt is not None and req.infill is not None:
            raise RequestError("infill", "give either prompt or infill, not both")
        sampler = req.sampler or s.default_sampler
        if not self.is_diffusion:
            return self._plan_ar(req)
        if sampler not in self.model.samplers:
            raise RequestError("sampler", f"{sampler!r} does not apply to a {self.model.model_type} model; "
                               f"choose one of {', '.join(self.model.samplers)}")
        mask_id = self.model.mask_id
        if req.infill is not None:
            if req.length is not None or req.stride is not None:
                raise RequestError("length" if req.length is not None else "stride",
                                   "not used with infill: the template fixes the length")
            ids = self.model.encode_prompt(req.infill)
            if mask_id not in ids:
                raise RequestError("infill", f"contains no mask token; mark the gaps with {self.mask_token!r}")
            if len(ids) > self.block:
                raise RequestError("infill", f"is {len(ids)} tokens; the model's block is {self.block}")
            template = torch.tensor(ids, dtype=torch.long).expand(req.num_samples, -1).clone()
            steps = req.steps or int((template[0] == mask_id).sum())
            return GenerateJob(req.num_samples, sampler, steps, req.top_p, req.seed, len(ids), template=template,
                               return_tokens=req.return_tokens)
        prefix = self._prefix(req.prompt)
        length = req.length or self.block
        if length > self.max_length:
            raise RequestError("length", f"{length} exceeds the limit {self.max_length}")
        if len(prefix) >= min(length, self.block):
            raise RequestError("prompt", f"is {len(prefix)} tokens; it must be shorter than length {length} and "
                                         f"the model's block {self.block}")
        if length > self.block:
            stride = req.stride or self.block // 2
            if not 0 < stride < self.block:
                raise RequestError("stride", f"must be in (0, {self.block}), got {stride}")
            steps = req.steps or self.block - len(prefix)
            return GenerateJob(req.num_samples, sampler, steps, req.top_p, req.seed, length, prefix=prefix,
                               stride=stride, return_tokens=req.return_tokens, kind="semi_ar")
        if req.stride is not None:
            raise RequestError("stride", f"only used when length exceeds the block of {self.block}")
        template = torch.full((req.num_samples, length), mask_id, dtype=torch.long)
        template[:, :len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        steps = req.steps or length - len(prefix)
        return GenerateJob(req.num_samples, sampler, steps, req.top_p, req.seed, length, template=template,
                           return_tokens=req.return_tokens)

    def check_prompt_chars(self, field: str, text: str | None) -> None:
        """A prompt or infill text within ``max_prompt_chars`` (checked before anything encodes it)."""
        limit = self.settings.max_prompt_chars
        if text is not None and len(text) > limit:
            raise RequestError(field, f"{len(text)} characters exceed the limit {limit}")

    def _prefix(self, prompt: str | None) -> list[int]:
        if prompt:
            return self.model.encode_prompt(prompt)
        bos = self.config.bos_token_id
        return [bos] if bos is not None else []

    def prefix_length(self, prompt: str | None) -> int:
        """Token positions a prompt takes at the start of its samples (with the BOS the model prepends)."""
        return len(self._prefix(prompt))

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the model's tokenizer (no special tokens added)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode_ids(self, ids: list[int]) -> str:
        """The text of token ids, special tokens left out (as in every generated sample)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _plan_ar(self, req: GenerateRequest) -> GenerateJob:
        if req.infill is not None:
            raise RequestError("infill", "the autoregressive model cannot infill")
        if req.stride is not None:
            raise RequestError("stride", "the autoregressive model has no semi-autoregressive mode")
        length = req.length or self.block
        if length > self.max_length:
            raise RequestError("length", f"{length} exceeds the limit {self.max_length}")
        prefix = self._prefix(req.prompt)
        if not prefix:
            raise RequestError("prompt", "the autoregressive model needs a prompt (it has no BOS token)")
        if len(prefix) >= length:
            raise RequestError("prompt", f"is {len(prefix)} tokens; it must be shorter than length {length}")
        return GenerateJob(req.num_samples, "autoregressive", length - len(prefix), req.top_p, req.seed, length,
                           prefix=prefix, return_tokens=req.return_tokens, kind="ar")

    def run_generate(self, jobs: list[GenerateJob]) -> list[dict[str, Any]]:
        """Run ``jobs`` (in order of the returned list), stacking compatible ones into shared sampler calls."""
        groups: dict[Any, _Group] = {}
        for index, job in enumerate(jobs):
            key = job.batch_key()
            group_id = key if key is not None else ("alone", index)
            groups.setdefault(group_id, _Group(key)).jobs.append((index, job))
        results: list[dict[str, Any]] = [{} for _ in jobs]
        for group in groups.values():
            members = [job for _, job in group.jobs]
            started = time.perf_counter()
            tokens, passes = self._run_group(members)
            stats = BatchStats(requests=len(members), rows=sum(job.num_samples for job in members),
                               forward_passes=passes, seconds=time.perf_counter() - started)
            parts = torch.split(tokens, [job.num_samples for job in members])
            for (index, job), part in zip(group.jobs, parts, strict=True):
                results[index] = self._result(job, part, stats)
        return results

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.model.device).manual_seed(seed)

    def _run_group(self, jobs: list[GenerateJob], callback: Callable[[int, Tensor], None] | None = None,
                   forward: Callable[[Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, int]:
        first = jobs[0]
        generator = self._generator(first.seed)
        device = self.model.device
        with torch.inference_mode():
            if first.kind == "ar":
                out = self.model.sample(first.num_samples, first.length, prefix=first.prefix, top_p=first.top_p,
                                        generator=generator)
                return out.tokens, out.num_forward_passes
            if first.kind == "semi_ar":
                out = self.model.sample(first.num_samples, first.length, prefix=first.prefix, stride=first.stride,
                                        steps=first.steps, sampler=first.sampler, top_p=first.top_p,
                                        generator=generator, callback=callback, forward=forward)
                return out.tokens, out.num_forward_passes
            template = torch.cat([job.template for job in jobs]).to(device)  # type: ignore[misc]
            out = self.model.sample(template.shape[0], template=template, steps=first.steps, sampler=first.sampler,
                                    top_p=first.top_p, generator=generator, callback=callback, forward=forward)
            return out.tokens, out.num_forward_passes

    def _result(self, job: GenerateJob, tokens: Tensor, stats: BatchStats) -> dict[str, Any]:
        texts = self.model.decode(tokens.cpu())
        samples = [{"text": text} for text in texts]
        if job.return_tokens:
            for sample, row in zip(samples, tokens.tolist(), strict=True):
                sample["tokens"] = row
        batch: dict[str, Any] = {"requests": stats.requests, "rows": stats.rows, "seconds": round(stats.seconds, 4)}
        if stats.shared is not None:
            batch.update(mode="continuous", mean_requests_per_pass=round(stats.shared.mean_requests, 3),
                         mean_rows_per_pass=round(stats.shared.mean_rows, 3))
        return {"samples": samples, "sampler": job.sampler, "steps": job.steps, "length": job.length,
                "num_forward_passes": stats.forward_passes, "batch": batch}

    # ----------------------------------------------------------------------------------------------------
    # Streaming

    def piece(self, token_id: int) -> str:
        """The text of one token (cached; byte-level pieces of a multi-byte character show as U+FFFD)."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=True)
            self._pieces[token_id] = text
        return text

    def frame(self, z: Tensor, step: int, steps: int) -> dict[str, Any]:
        """One streamed state: per sample the token texts, ``null`` where a position is still masked."""
        mask_id = self.config.mask_token_id
        rows = z.tolist()
        samples = [[None if t == mask_id else self.piece(t) for t in row] for row in rows]
        masked = sum(piece is None for row in samples for piece in row)
        return {"type": "state", "step": step, "steps": steps, "masked": masked, "samples": samples}

    def stream(self, job: GenerateJob, emit: Callable[[dict[str, Any]], None],
               cancelled: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Run one job alone, calling ``emit`` with intermediate states (at most ``max_stream_frames``)."""
        if not self.is_diffusion:
            raise RequestError("sampler", "streaming denoising states needs a masked diffusion model")
        every = max(1, math.ceil(job.steps / self.settings.max_stream_frames))
        last_masked = [-1]

        def on_step(index: int, z: Tensor) -> None:
            if cancelled():
                raise Cancelled
            if index >= 0 and (index + 1) % every and index + 1 != job.steps:
                return
            masked = int((z == self.config.mask_token_id).sum())
            if masked == last_masked[0]:
                return
            last_masked[0] = masked
            emit(self.frame(z, index + 1 if index >= 0 else 0, job.steps))

        if job.template is not None:
            emit(self.frame(job.template, 0, job.steps))
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            forward, shared = stack.enter_context(self.batcher.session()) if self.batcher else (None, None)
            tokens, passes = self._run_group([job], callback=on_step, forward=forward)
        if last_masked[0] != 0:  # a sampler may stop early once nothing is masked: show the final state
            emit(self.frame(tokens, job.steps, job.steps))
        stats = BatchStats(shared.max_requests if shared else 1, job.num_samples, passes,
                           time.perf_counter() - started, shared)
        return {"type": "done", **self._result(job, tokens, stats)}

    # ----------------------------------------------------------------------------------------------------
    # Scoring

    def plan_score(self, req: ScoreRequest) -> tuple[list[Tensor], list[Tensor]]:
        """Token blocks per text: [BOS] text [EOS] cut into rows of max_seq_len, the last one padded."""
        s = self.settings
        if len(req.texts) > s.max_texts:
            raise RequestError("texts", f"{len(req.texts)} texts exceed the limit {s.max_texts}")
        if req.mc_samples > s.max_mc_samples:
            raise RequestError("mc_samples", f"{req.mc_samples} exceeds the limit {s.max_mc_samples}")
        rows, masks = [], []
        for i, text in enumerate(req.texts):
            if not text:
                raise RequestError(f"texts[{i}]", "is empty")
            if len(text) > s.max_text_chars:
                raise RequestError(f"texts[{i}]", f"{len(text)} characters exceed the limit {s.max_text_chars}")
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if self.config.mask_token_id is not None and self.config.mask_token_id in ids:
                raise RequestError(f"texts[{i}]", f"contains the mask token {self.mask_token!r}")
            ids = ([self.config.bos_token_id] if self.config.bos_token_id is not None else []) + ids
            ids += [self.config.eos_token_id] if self.config.eos_token_id is not None else []
            count = math.ceil(len(ids) / self.block)
            block = torch.full((count * self.block,), self.config.pad_token_id or 0, dtype=torch.long)
            block[:len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask = torch.zeros(count * self.block, dtype=torch.long)
            mask[:len(ids)] = 1
            rows.append(block.view(count, self.block))
            masks.append(mask.view(count, self.block))
        return rows, masks

    def score(self, req: ScoreRequest) -> dict[str, Any]:
        """Score one request (see ``score_many``)."""
        return self.score_many([req])[0]

    def score_many(self, reqs: list[ScoreRequest]) -> list[dict[str, Any]]:
        """NELBO per token (nats) of each text, averaged over ``mc_samples`` time samples, with its standard error
        over those samples and the perplexity bound exp(NELBO); the exact NLL for the AR model.

        Requests with the same ``mc_samples`` share one forward batch. Block ``i`` of a request draws its masks
        from its own generator seeded by (request seed, i), so a text's score never depends on what else is in
        the batch."""

        planned = [self.plan_score(req) for req in reqs]
        results: list[dict[str, Any]] = [{} for _ in reqs]
        device = self.model.device
        by_samples: dict[int, list[int]] = {}
        for index, req in enumerate(reqs):
            by_samples.setdefault(req.mc_samples, []).append(index)
        for mc_samples, members in by_samples.items():
            rows = [block for i in members for block in planned[i][0]]
            masks = [mask for i in members for mask in planned[i][1]]
            generators = [g for i in members
                          for g in row_generators(reqs[i].seed, range(sum(b.shape[0] for b in planned[i][0])))]
            with torch.inference_mode():
                nll, tokens = sequence_nll(self.model, torch.cat(rows).to(device), torch.cat(masks).to(device),
                                           mc_samples=mc_samples, generator=generators)
            nll, tokens = nll.double().cpu(), tokens.double().cpu()
            start = 0
            for i in members:
                texts = []
                for block in planned[i][0]:
                    count = block.shape[0]
                    texts.append(self._text_score(nll[start:start + count].sum(0), float(tokens[start:start + count]
                                                                                          .sum())))
                    start += count
                results[i] = {"results": texts, "mc_samples": mc_samples, "batch_requests": len(members),
                              "bound": "NELBO (upper bound on NLL)" if self.model.objective.is_bound else "exact NLL"}
        return results

    @staticmethod
    def _text_score(per_sample: Tensor, num_tokens: float) -> dict[str, Any]:
        """Per-token NELBO of one text from its K Monte-Carlo totals, with the standard error of their mean."""
        k = per_sample.numel()
        nelbo = float(per_sample.mean()) / num_tokens
        se = float(per_sample.std(unbiased=True)) / math.sqrt(k) / num_tokens if k > 1 else None
        return {"num_tokens": int(num_tokens), "nelbo": nelbo, "perplexity_bound": safe_exp(nelbo),
                "std_error": se}

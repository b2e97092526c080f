"""A single-process training loop over in-memory token rows (the quickstart, tests, and the baseline that
the distributed trainer is benchmarked against). Gradient accumulation reaches the global batch; each step is
:func:`mdlm.train.step.train_step`, as in the Ray Train loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mdlm.config import TrainingConfig
from mdlm.modeling import MDLM, ARModel
from mdlm.train.ema import EMA
from mdlm.train.optim import build_optimizer, build_scheduler
from mdlm.train.step import NonFiniteLoss, StepSettings, train_step
from mdlm.train.validate import validate


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def batches(rows: Tensor, mask: Tensor | None, batch_size: int, generator: torch.Generator,
            device: torch.device) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled mini-batches (a fresh permutation each epoch) on ``device``."""
    if rows.shape[0] < batch_size:
        raise ValueError(f"{rows.shape[0]} training rows are fewer than one micro-batch of {batch_size}")
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for i in range(0, rows.shape[0] - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            batch = {"input_ids": rows[idx].to(device)}
            if mask is not None:
                batch["attention_mask"] = mask[idx].to(device)
            yield batch


def evaluate(model: MDLM | ARModel, rows: Tensor, mask: Tensor | None = None, batch_size: int = 32,
             seed: int = 0) -> dict[str, float]:
    """Mean NELBO (MDLM) or NLL (AR) per token over ``rows`` and its perplexity (bound): the training loops'
    :func:`mdlm.train.validate.validate` over ``rows`` cut into batches."""
    device = model.device
    chunks = []
    for i in range(0, rows.shape[0], batch_size):
        batch = {"input_ids": rows[i:i + batch_size].to(device)}
        if mask is not None:
            batch["attention_mask"] = mask[i:i + batch_size].to(device)
        chunks.append(batch)
    result = validate(model, model.objective, chunks, seed)
    return {"nll": result.value, "ppl": result.ppl, "tokens": result.tokens}


def train_local(model: MDLM | ARModel, rows: Tensor, config: TrainingConfig, *, attention_mask: Tensor | None = None,
                ema: EMA | None = None, on_log: Callable[[dict[str, float]], None] | None = None) -> TrainState:
    """Train ``model`` on ``rows`` [N, L] for ``config.max_steps`` optimizer steps."""
    torch.manual_seed(config.seed)
    device = model.device
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    settings = StepSettings(accumulation=config.global_batch_size // config.micro_batch_size,
                            grad_clip=config.grad_clip, autocast_bf16=config.precision == "bf16")
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    stream = batches(rows, attention_mask, config.micro_batch_size, torch.Generator().manual_seed(config.seed),
                     device)
    state = TrainState()
    model.train()
    tokens_seen, started = 0, time.perf_counter()
    for step in range(config.max_steps):
        try:
            result = train_step(model, model.objective, optimizer, scheduler, ema, lambda: next(stream), settings,
                                noise_generator)
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(exc.loss, step + 1) from None
        tokens_seen += result.tokens
        state.step = step + 1
        if state.step % config.log_every == 0 or state.step == config.max_steps:
            elapsed = time.perf_counter() - started
            record = {"step": float(state.step), "loss": result.loss, "grad_norm": result.grad_norm,
                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
            state.history.append(record)
            if on_log is not None:
                on_log(record)
    return state

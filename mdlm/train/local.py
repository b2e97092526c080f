"""A single-process training loop over in-memory token rows (the quickstart, tests, and the baseline that
the distributed trainer is benchmarked against). Gradient accumulation reaches the global batch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mdlm.config import TrainingConfig
from mdlm.modeling import MDLM, ARModel
from mdlm.train.ema import EMA
from mdlm.train.optim import build_optimizer, build_scheduler


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def batches(rows: Tensor, mask: Tensor | None, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches (a fresh permutation each epoch)."""
    if rows.shape[0] < batch_size:
        raise ValueError(f"{rows.shape[0]} training rows are fewer than one micro-batch of {batch_size}")
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for i in range(0, rows.shape[0] - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield rows[idx], (None if mask is None else mask[idx])


@torch.no_grad()
def evaluate(model: MDLM | ARModel, rows: Tensor, mask: Tensor | None = None, batch_size: int = 32,
             seed: int = 0) -> dict[str, float]:
    """Mean NELBO (MDLM) or NLL (AR) per token over ``rows`` and its perplexity (bound)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    total, tokens = 0.0, 0.0
    for i in range(0, rows.shape[0], batch_size):
        x = rows[i:i + batch_size].to(model.device)
        m = None if mask is None else mask[i:i + batch_size].to(model.device)
        out = model.loss(x, m, generator=generator)
        total += float(out.nll_sum)
        tokens += float(out.num_tokens)
    model.train(was_training)
    nll = total / max(tokens, 1.0)
    return {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "tokens": tokens}


def train_local(model: MDLM | ARModel, rows: Tensor, config: TrainingConfig, *, attention_mask: Tensor | None = None,
                ema: EMA | None = None, on_log: Callable[[dict[str, float]], None] | None = None) -> TrainState:
    """Train ``model`` on ``rows`` [N, L] for ``config.max_steps`` optimizer steps."""
    torch.manual_seed(config.seed)
    device = model.device
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    accumulation = config.global_batch_size // config.micro_batch_size
    generator = torch.Generator().manual_seed(config.seed)
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    stream = batches(rows, attention_mask, config.micro_batch_size, generator)
    state = TrainState()
    model.train()
    tokens_seen, started = 0, time.perf_counter()
    for step in range(config.max_steps):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(accumulation):
            x, m = next(stream)
            x = x.to(device)
            m = None if m is None else m.to(device)
            with autocast_context(device, config.precision):
                out = model.loss(x, m, generator=noise_generator)
            (out.loss / accumulation).backward()
            loss_sum += out.loss.item()
            tokens_seen += x.numel()
        loss = loss_sum / accumulation
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; stopping")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        state.step = step + 1
        if state.step % config.log_every == 0 or state.step == config.max_steps:
            elapsed = time.perf_counter() - started
            record = {"step": float(state.step), "loss": loss, "grad_norm": float(grad_norm),
                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
            state.history.append(record)
            if on_log is not None:
                on_log(record)
    return state

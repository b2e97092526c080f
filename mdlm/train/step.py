"""One optimizer step, shared by the Ray Train loop and the single-process loop (torchtitan's ``train_step``).

Micro-batches are accumulated to the global batch, gradients clipped, the loss averaged over ranks and checked
before the optimizer moves, then the learning-rate schedule and the EMA follow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mdlm.diffusion.objective import Objective
from mdlm.train.collectives import all_reduce_sum, rank_and_world
from mdlm.train.ema import EMA


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the optimizer did not step."""

    def __init__(self, loss: float, step: int | None = None) -> None:
        super().__init__(f"non-finite loss {loss}" + (f" at step {step}" if step is not None else ""))
        self.loss = loss


@dataclass(frozen=True)
class StepResult:
    loss: float  # objective per real token, averaged over micro-batches and ranks
    grad_norm: float  # before clipping
    tokens: int  # token positions this rank processed


@dataclass(frozen=True)
class StepSettings:
    accumulation: int  # micro-batches per rank per optimizer step
    grad_clip: float  # 0: no clipping
    autocast_bf16: bool = False  # bf16 autocast (not under FSDP2, whose mixed-precision policy casts instead)


def train_step(model: torch.nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA | None,
               next_batch: Callable[[], dict[str, Tensor]], settings: StepSettings,
               generator: torch.Generator | None) -> StepResult:
    """Accumulate ``settings.accumulation`` micro-batches from ``next_batch()`` (``input_ids`` and optionally
    ``attention_mask`` on the model's device), then clip, check and step. Raises :class:`NonFiniteLoss`
    (before the optimizer step) when the loss is NaN or infinite."""
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    tokens = 0
    for _ in range(settings.accumulation):
        batch = next_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.autocast_bf16):
            out = objective.loss(model.backbone, batch["input_ids"], batch.get("attention_mask"),
                                 generator=generator)
        (out.loss / settings.accumulation).backward()
        loss_sum += out.loss.detach().double()
        tokens += batch["input_ids"].numel()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    _, world = rank_and_world()
    loss = all_reduce_sum([float(loss_sum) / settings.accumulation], device)[0] / world
    if not math.isfinite(loss):
        raise NonFiniteLoss(loss)
    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update(model)
    return StepResult(loss=loss, grad_norm=float(grad_norm), tokens=tokens)

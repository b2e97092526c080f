"""AdamW and the learning-rate schedule (linear warm-up, then constant as in MDLM, or cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mdlm.config import TrainingConfig


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel (one pass over all tensors) where it applies.

    Fused matters most for sharded (FSDP2 DTensor) parameters: the per-tensor path dispatches every
    element-wise op through DTensor, which costs more than the update itself for CPU-sized models.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_floating_point() for p in params) and len({p.device.type for p in params}) == 1 \
        and params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps,
                             weight_decay=config.weight_decay, fused=fused or None)


def lr_multiplier(step: int, config: TrainingConfig) -> float:
    """Factor on ``config.lr`` at optimizer step ``step`` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))

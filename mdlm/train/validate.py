"""Validation: the objective per token over a fixed set of batches, the one routine both training loops use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mdlm.diffusion.objective import Objective
from mdlm.eval.metrics import safe_exp
from mdlm.train.collectives import all_reduce_sum, rank_and_world
from mdlm.train.parallelize import reshard


@dataclass(frozen=True)
class Validation:
    metric: str  # 'nelbo' (MDLM: an upper bound) or 'nll' (AR: exact)
    value: float  # nats per real token
    tokens: float

    @property
    def ppl(self) -> float:
        return safe_exp(self.value)

    def metrics(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}{self.metric}": self.value, f"{prefix}ppl": self.ppl}


@torch.no_grad()
def validate(model: torch.nn.Module, objective: Objective, batches: Sequence[dict[str, Tensor]],
             seed: int) -> Validation:
    """The objective per real token over ``batches`` (dicts of ``input_ids``/``attention_mask`` on the model's
    device). Batch ``i`` draws its noise from a generator seeded ``seed + i``, so the value does not depend on
    the number of ranks; under a process group the batches are split round-robin and every rank runs the same
    number of forward passes (FSDP needs it), padding with zero-weight repeats."""
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    per_rank = math.ceil(len(batches) / world) if batches else 0
    total, tokens = 0.0, 0.0
    device = next(model.parameters()).device
    for i in range(per_rank):
        index = i * world + rank
        batch = batches[index % len(batches)]
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(seed + index)
        out = objective.loss(model.backbone, batch["input_ids"], batch.get("attention_mask"), generator=generator)
        if index < len(batches):
            total += float(out.nll_sum)
            tokens += float(out.num_tokens)
    reshard(model)
    model.train(was_training)
    total, tokens = all_reduce_sum([total, tokens], device)
    return Validation(metric=objective.metric, value=total / max(tokens, 1.0), tokens=tokens)

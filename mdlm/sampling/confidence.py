"""Confidence-based parallel decoding for MDLM (as Fast-dLLM and LLaDA decode, Wu et al. 2025): each forward
pass unmasks the masked positions the denoiser is most sure of.

This is a heuristic, NOT an exact sampler of the model's distribution: which positions unmask depends on
x_theta itself (not on the forward process's uniform order), and the positions unmasked in one pass are drawn
independently of one another from their marginals. It trades fidelity for fewer forward passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm.diffusion.schedules import NoiseSchedule
from mdlm.sampling.base import Denoise, SampleOutput, StepCallback
from mdlm.sampling.categorical import resolve_dtype, sample_categorical, token_probs

__all__ = ["confidence_sample", "select_confident", "tokens_per_step_for"]


def tokens_per_step_for(masked: Tensor, steps: int) -> Tensor:
    """k per row when it is not given: ceil(masked tokens / steps), so that a row finishes within ``steps``
    passes (``masked`` [B] counts each row's masked positions at the start)."""
    return (masked + steps - 1) // steps


def select_confident(confidence: Tensor, masked: Tensor, *, threshold: float | None = None,
                     k: Tensor | None = None) -> Tensor:
    """The positions [R, L] to unmask in one pass, from each masked position's confidence [R, L] (the
    probability of its most likely token): those above ``threshold`` and always the most confident one, or
    the ``k`` [R] most confident. Ties go to the lower position."""
    if (threshold is None) == (k is None):
        raise ValueError("give exactly one of threshold and k")
    score = torch.where(masked, confidence, torch.full_like(confidence, -1.0))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    if threshold is not None:
        return masked & ((score > threshold) | (rank == 0))
    return masked & (rank < k[:, None])


@torch.no_grad()
def confidence_sample(denoise: Denoise, z: Tensor, schedule: NoiseSchedule, mask_id: int, *,
                      threshold: float | None = 0.9, tokens_per_step: int | None = None, steps: int | None = None,
                      top_p: float = 1.0, dtype: str | torch.dtype = torch.float64,
                      generator: torch.Generator | None = None,
                      callback: StepCallback | None = None) -> SampleOutput:
    """Parallel decoding by confidence; not an exact sampler (see the module docstring).

    Per forward pass, each row with masked positions unmasks, by the probability of each position's most likely
    token under x_theta: every position above ``threshold`` (at least the most confident one) when a threshold
    is given; else the ``tokens_per_step`` most confident (k = ceil(masked / ``steps``) when not given). The
    chosen positions draw their tokens from x_theta, nucleus-filtered by ``top_p``, by Gumbel-max in ``dtype``
    (a tiny ``top_p`` gives the argmax, Fast-dLLM's greedy choice). Given positions never change; a row that
    is done is not recomputed. The time fed to the denoiser is the t at which the row's masked fraction is
    the forward process's 1 - alpha_t. Forward passes: at most the masked tokens (threshold), ceil(masked / k).
    """
    dtype = resolve_dtype(dtype)
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {threshold}")
        k = None
    else:
        if tokens_per_step is None and (steps is None or steps < 1):
            raise ValueError(f"steps must be >= 1 when tokens_per_step is not given, got {steps}")
        if tokens_per_step is not None and tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    z = z.clone()
    initial = (z == mask_id).sum(dim=-1)
    if threshold is None:
        k = torch.full_like(initial, tokens_per_step) if tokens_per_step is not None else \
            tokens_per_step_for(initial, steps)  # type: ignore[arg-type]
    passes = 0
    while True:
        masked = z == mask_id
        count = masked.sum(dim=-1)
        active = count > 0
        if not active.any():
            break
        rows = active.nonzero().squeeze(-1)
        fraction = count[rows].double() / initial[rows].double()
        t = schedule.inverse_mask_prob(fraction).to(z.device, torch.float32)
        log_probs = denoise(z[rows], t)
        passes += 1
        confidence = log_probs.max(dim=-1).values.double().exp()
        chosen = select_confident(confidence, masked[rows], threshold=threshold,
                                  k=None if k is None else k[rows])
        window = z[rows]
        window[chosen] = sample_categorical(token_probs(log_probs[chosen], top_p, dtype), dtype=dtype,
                                            generator=generator)
        z[rows] = window
        if callback is not None:
            callback(passes - 1, z)
    return SampleOutput(tokens=z, num_forward_passes=passes)

"""Samplers for masked diffusion: ancestral, cached ancestral, ReMDM remasking, first-hitting,
semi-autoregressive (confidence-based parallel decoding: :mod:`mdlm.sampling.confidence`).

Every sampler starts from a template z [B, L] holding [MASK] where tokens are to be generated and the
given tokens elsewhere (a prefix, or the known parts of an infill); given positions never change.
``denoise(z, t)`` returns x_theta(z, t) as SUBS log-probabilities [B, L, V].

Ancestral step t -> s (MDLM Eq. 7 with SUBS): a masked position stays masked with probability
(1 - alpha_s) / (1 - alpha_t) and otherwise takes a token drawn from x_theta. It is drawn here in two
stages (unmask or not, then which token), the same distribution as one categorical over V + 1 outcomes,
so that a step in which nothing unmasks costs no vocabulary-sized work.

ReMDM (Wang et al. 2025) runs the same loop with a remasking probability sigma_t (``mdlm.diffusion.remdm``):
a generated token is remasked with probability sigma_t, and a masked one unmasks with
(alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t); sigma_t = 0 is the ancestral step, draw for draw.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from mdlm.config import SAMPLERS
from mdlm.diffusion.objective import reverse_unmask_prob
from mdlm.diffusion.remdm import remask_sigma, remdm_unmask_prob
from mdlm.diffusion.schedules import NoiseSchedule
from mdlm.rng import uniform
from mdlm.sampling.base import Denoise, SampleOutput, StepCallback
from mdlm.sampling.categorical import resolve_dtype, sample_categorical, token_probs
from mdlm.sampling.confidence import confidence_sample

# (s, t, log_mass [N]) -> P(unmask) [N] for N masked positions whose denoiser output has total mass
# exp(log_mass) over real tokens; None: the exact (alpha_s - alpha_t) / (1 - alpha_t) of a normalised x_theta.
UnmaskRule = Callable[[Tensor, Tensor, Tensor], Tensor]
RemaskRule = Callable[[Tensor, Tensor], Tensor]  # (s, t) -> sigma_t, ReMDM's remasking probability of the step

__all__ = ["SAMPLERS", "SampleOutput", "ancestral_sample", "first_hitting_sample", "run_sampler",
           "semi_autoregressive_sample"]


@torch.no_grad()
def ancestral_sample(denoise: Denoise, z: Tensor, schedule: NoiseSchedule, mask_id: int, *, steps: int,
                     cache: bool = False, top_p: float = 1.0, dtype: str | torch.dtype = torch.float64,
                     generator: torch.Generator | None = None, callback: StepCallback | None = None,
                     unmask_rule: UnmaskRule | None = None, remask: RemaskRule | None = None) -> SampleOutput:
    """Ancestral sampling on the uniform grid t_i = 1 - i / steps, ending at t = 0 with nothing masked.

    ``denoise`` may return unnormalised log-weights over the real tokens (SEDD's scores, D3PM's x~ without its
    [MASK] mass); ``unmask_rule`` then gives each masked position's probability of leaving the mask from its
    total mass, and the token is drawn in proportion to the weights. The rule must return 1 at s = 0.

    ``cache=True`` reuses x_theta for every row whose z is unchanged (valid only without time conditioning,
    where x_theta depends on z alone) and recomputes only the rows that changed: the same draws as without
    it under one seed, and per row at most min(steps, number of masked tokens) forward computations, however
    many other rows share the batch.

    ``remask`` (ReMDM) gives sigma_t for each step: every generated position (masked in the template) that is
    not masked at t is remasked with probability sigma_t, read from the same uniform draw that decides a masked
    position's unmasking (each position is one or the other), so ``remask`` returning 0 draws exactly what the
    ancestral sampler draws. Given positions are never remasked; the loop runs every step (a remasked token
    unmasks again later), and a step in which nothing is masked costs no forward pass.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if remask is not None and unmask_rule is not None:
        raise ValueError("remasking applies to MDLM's reverse step; it cannot be combined with an unmask_rule")
    dtype = resolve_dtype(dtype)
    z = z.clone()
    generated = z == mask_id  # the positions a sampler may change (remasking never touches the others)
    batch = z.shape[0]
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    log_probs: Tensor | None = None
    stale = torch.ones(batch, dtype=torch.bool, device=z.device)  # rows whose cached x_theta is out of date
    passes = 0
    for i in range(steps):
        masked = z == mask_id
        any_masked = bool(masked.any())
        if not any_masked and remask is None:
            break
        t, s = times[i], times[i + 1]
        if not any_masked:
            pass  # only remasking can happen: x_theta is not needed this step
        elif not cache or log_probs is None or bool(stale.all()):
            log_probs = denoise(z, t.expand(batch).to(z.device, torch.float32))
            passes += 1
            stale.zero_()
        elif stale.any():
            rows = stale.nonzero().squeeze(1)
            log_probs[rows] = denoise(z[rows], t.expand(rows.numel()).to(z.device, torch.float32))
            passes += 1
            stale.zero_()
        draws = uniform(tuple(z.shape), dtype=dtype, device=z.device, generator=generator)
        remasked = None
        if remask is not None:
            sigma = remask(s, t)
            unmask = masked & (draws < remdm_unmask_prob(schedule, s, t, sigma).item())
            remasked = generated & ~masked & (draws < sigma.item())
        elif unmask_rule is None:
            unmask = masked & (draws < reverse_unmask_prob(schedule, s, t).item())
        else:
            p_unmask = unmask_rule(s, t, torch.logsumexp(log_probs[masked].double(), dim=-1))
            unmask = masked.clone()
            unmask[masked] = draws[masked] < p_unmask.to(draws.dtype)
        if unmask.any():
            # Only the positions that unmask need their distribution in sampling precision.
            z[unmask] = sample_categorical(token_probs(log_probs[unmask], top_p, dtype), dtype=dtype,
                                           generator=generator)
            stale |= unmask.any(dim=1)  # these rows changed: their cached x_theta is out of date
        if remasked is not None and remasked.any():
            z[remasked] = mask_id
            stale |= remasked.any(dim=1)
        if callback is not None:
            callback(i, z)
    return SampleOutput(tokens=z, num_forward_passes=passes)


@torch.no_grad()
def first_hitting_sample(denoise: Denoise, z: Tensor, schedule: NoiseSchedule, mask_id: int, *,
                         top_p: float = 1.0, dtype: str | torch.dtype = torch.float64,
                         generator: torch.Generator | None = None,
                         callback: StepCallback | None = None) -> SampleOutput:
    """First-hitting sampler (Zheng et al. 2024): exact, one token per forward pass.

    With n masked positions at time t, the time of the next unmasking is s with
    1 - alpha_s = (1 - alpha_t) v^(1/n), v ~ U(0, 1); one masked position, uniformly chosen, then takes a
    token from x_theta(z, s). The cost is the number of masked tokens, whatever the step count.
    """
    dtype = resolve_dtype(dtype)
    z = z.clone()
    batch = z.shape[0]
    t = torch.ones(batch, dtype=torch.float64, device=z.device)
    passes = 0
    while True:
        masked = z == mask_id
        n = masked.sum(dim=-1)
        active = n > 0
        if not active.any():
            break
        rows = active.nonzero().squeeze(-1)
        v = uniform((rows.numel(),), dtype=torch.float64, device=z.device, generator=generator)
        s = schedule.inverse_mask_prob(schedule.mask_prob(t[rows]) * v ** (1.0 / n[rows].double()))
        t[rows] = s
        # One masked position per active row, uniformly: argmax of uniform keys over masked positions.
        keys = uniform((rows.numel(), z.shape[1]), dtype=torch.float64, device=z.device, generator=generator)
        position = torch.where(masked[rows], keys, torch.full_like(keys, -1.0)).argmax(dim=-1)
        log_probs = denoise(z[rows], s.float())
        passes += 1
        picked = log_probs[torch.arange(rows.numel(), device=z.device), position]
        z[rows, position] = sample_categorical(token_probs(picked, top_p, dtype), dtype=dtype, generator=generator)
        if callback is not None:
            callback(passes - 1, z)
    return SampleOutput(tokens=z, num_forward_passes=passes)


def run_sampler(name: str, denoise: Denoise, z: Tensor, schedule: NoiseSchedule, mask_id: int, *, steps: int,
                top_p: float = 1.0, dtype: str | torch.dtype = torch.float64,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                allow_cache: bool = True, unmask_rule: UnmaskRule | None = None,
                confidence_threshold: float = 0.9, tokens_per_step: int | None = None,
                remask_schedule: str = "cap", remask_eta: float = 0.01) -> SampleOutput:
    """Dispatch to a sampler by name: 'ancestral', 'cached' (ancestral with reuse), 'first_hitting', 'remdm'
    (ancestral with ReMDM remasking, sigma_t from ``remask_schedule`` and ``remask_eta``; reuses x_theta like
    'cached' when ``allow_cache``), 'confidence' (``confidence_threshold``) or 'confidence_k'
    (``tokens_per_step``, else ceil(masked / steps)). ``unmask_rule`` (see :func:`ancestral_sample`) applies to
    the ancestral two ('euler' is SEDD's rule, chosen by the model, on the ancestral loop)."""
    if name == "first_hitting":
        return first_hitting_sample(denoise, z, schedule, mask_id, top_p=top_p, dtype=dtype, generator=generator,
                                    callback=callback)
    if name in ("ancestral", "cached", "euler"):
        return ancestral_sample(denoise, z, schedule, mask_id, steps=steps, cache=name == "cached" and allow_cache,
                                top_p=top_p, dtype=dtype, generator=generator, callback=callback,
                                unmask_rule=unmask_rule)
    if name == "remdm":
        remask_sigma(schedule, torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64),
                     kind=remask_schedule, eta=remask_eta)  # check the settings before any work
        return ancestral_sample(denoise, z, schedule, mask_id, steps=steps, cache=allow_cache, top_p=top_p,
                                dtype=dtype, generator=generator, callback=callback,
                                remask=functools.partial(remask_sigma, schedule, kind=remask_schedule,
                                                         eta=remask_eta))
    if name in ("confidence", "confidence_k"):
        threshold = confidence_threshold if name == "confidence" else None
        return confidence_sample(denoise, z, schedule, mask_id, threshold=threshold,
                                 tokens_per_step=tokens_per_step, steps=steps, top_p=top_p, dtype=dtype,
                                 generator=generator, callback=callback)
    raise ValueError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")


def semi_autoregressive_sample(sample_block: Callable[[Tensor], SampleOutput], prefix: Tensor, total_length: int,
                               block_length: int, stride: int, mask_id: int,
                               callback: Callable[[Tensor], None] | None = None) -> SampleOutput:
    """Generate ``total_length`` tokens beyond the block length (MDLM Sec. 4.2 / Alg. 2).

    The first window holds ``prefix`` [B, P] and masks up to ``block_length``; each further round keeps the
    last ``block_length - stride`` tokens as context and appends ``stride`` new masked positions.
    ``sample_block(z)`` fills one window; ``callback(tokens)`` sees the sequence after each round.
    """
    if not 0 < stride < block_length:
        raise ValueError(f"stride must be in (0, block_length={block_length}), got {stride}")
    batch, given = prefix.shape
    if given >= block_length:
        raise ValueError(f"prefix of {given} tokens leaves no room in a block of {block_length}")
    if total_length <= given:
        raise ValueError(f"length {total_length} must exceed the prefix length {given}")
    first = min(block_length, total_length)
    window = torch.full((batch, first), mask_id, dtype=prefix.dtype, device=prefix.device)
    window[:, :given] = prefix
    out = sample_block(window)
    tokens, passes = out.tokens, out.num_forward_passes
    if callback is not None:
        callback(tokens)
    context = block_length - stride
    while tokens.shape[1] < total_length:
        new = min(stride, total_length - tokens.shape[1])
        masks = torch.full((batch, new), mask_id, dtype=prefix.dtype, device=prefix.device)
        out = sample_block(torch.cat((tokens[:, -context:], masks), dim=1))
        tokens = torch.cat((tokens, out.tokens[:, -new:]), dim=1)
        passes += out.num_forward_passes
        if callback is not None:
            callback(tokens)
    return SampleOutput(tokens=tokens, num_forward_passes=passes)

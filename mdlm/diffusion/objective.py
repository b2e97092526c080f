"""The MDLM objective: absorbing-state forward process, SUBS parameterization and the NELBO.

Notation (Sahoo et al. 2024): x is the clean sequence, z_t the noised one, m the [MASK] token,
x_theta(z_t, t) the denoiser's distribution over the vocabulary, alpha_t the schedule. The
Rao-Blackwellized continuous-time NELBO (Eq. 10) is

    L = E_{t ~ U[eps, 1]} [ -alpha'_t / (1 - alpha_t) * sum_{l : z_t^l = m} -log <x_theta^l(z_t, t), x^l> ]

and with T discrete steps (Eq. 8), t in {1/T, ..., 1}, s = t - 1/T,

    L_T = T * E_t [ (alpha_s - alpha_t) / (1 - alpha_t) * sum_{l : z_t^l = m} -log <x_theta^l(z_t, t), x^l> ].

Both are reported per real token: divided by the number of attention-mask tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mdlm.config import NoiseConfig
from mdlm.diffusion.schedules import NoiseSchedule
from mdlm.rng import uniform

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (z_t [B, L], t [B]) -> logits [B, L, V]


@dataclass
class LossOutput:
    """A batch's objective: ``loss`` per real token, plus the sums a distributed mean needs."""

    loss: Tensor  # scalar: nll_sum / num_tokens
    nll_sum: Tensor  # scalar: sum over the batch of the per-sequence NELBO (or NLL) estimates
    num_tokens: Tensor  # scalar: number of real (attention-mask) tokens


def antithetic_uniform(batch_size: int, *, antithetic: bool = True, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> Tensor:
    """u_i in [0, 1): low-discrepancy u_i = (u + i / B) mod 1 with one shared u, or i.i.d. if not antithetic."""
    if not antithetic:
        return uniform((batch_size,), dtype=torch.float64, device=device, generator=generator)
    u = uniform((1,), dtype=torch.float64, device=device, generator=generator)
    offsets = torch.arange(batch_size, dtype=torch.float64, device=device) / batch_size
    return torch.remainder(u + offsets, 1.0)


def continuous_times(u: Tensor, eps: float) -> Tensor:
    """t = eps + (1 - eps) u: times in [eps, 1] for the continuous-time NELBO."""
    return eps + (1.0 - eps) * u


def discrete_times(u: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
    """Snap u in [0, 1) to t in {1/T, ..., 1}; return (s, t) with s = t - 1/T."""
    i = torch.floor(u * num_steps).clamp(0, num_steps - 1) + 1
    t = i / num_steps
    return t - 1.0 / num_steps, t


def forward_mask(x: Tensor, t: Tensor, schedule: NoiseSchedule, mask_id: int, *,
                 attention_mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Sample z_t ~ q(z_t | x): each real token becomes [MASK] with probability 1 - alpha_t, independently."""
    p_mask = schedule.mask_prob(t).to(device=x.device)[:, None]
    draws = uniform(x.shape, dtype=torch.float64, device=x.device, generator=generator)
    masked = draws < p_mask
    if attention_mask is not None:
        masked &= attention_mask.bool()
    return torch.where(masked, torch.full_like(x, mask_id), x)


def zero_masked_log_probs(logits: Tensor, mask_id: int) -> Tensor:
    """SUBS step (1), zero-masking: log-softmax in float32 with no probability on [MASK]."""
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def subs_log_probs(logits: Tensor, z_t: Tensor, mask_id: int) -> Tensor:
    """SUBS parameterization: log x_theta(z_t, t) in float32.

    (1) zero-masking: no probability on [MASK]; (2) carry-over unmasking: a position already unmasked
    in z_t keeps its token with probability 1.
    """
    log_probs = zero_masked_log_probs(logits, mask_id)
    unmasked = z_t != mask_id
    carried = torch.full_like(log_probs, float("-inf"))
    carried.scatter_(-1, z_t.unsqueeze(-1), 0.0)
    return torch.where(unmasked.unsqueeze(-1), carried, log_probs)


def subs_masked_nll(logits: Tensor, x: Tensor, z_t: Tensor, mask_id: int) -> Tensor:
    """-log <x_theta^l(z_t, t), x^l> at masked positions of z_t and 0 elsewhere, [B, L] float32.

    Equals ``-subs_log_probs(...).gather(x)`` on masked positions (carry-over makes the others exact), but
    uses one fused cross-entropy instead of materialising the full SUBS distribution.
    """
    logits = logits.float()
    mask_column = torch.zeros(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    mask_column[mask_id] = float("-inf")
    nll = F.cross_entropy((logits + mask_column).flatten(0, -2), x.flatten(), reduction="none").view(x.shape)
    return torch.where(z_t == mask_id, nll, torch.zeros_like(nll))


def continuous_nelbo_weight(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """-alpha'_t / (1 - alpha_t): weight of the masked-token NLL in the continuous-time NELBO (Eq. 10)."""
    return -schedule.alpha_prime(t) / schedule.mask_prob(t)


def discrete_nelbo_weight(schedule: NoiseSchedule, s: Tensor, t: Tensor) -> Tensor:
    """(alpha_s - alpha_t) / (1 - alpha_t): weight of the masked-token NLL in step t of the T-step NELBO."""
    return (schedule.alpha(s) - schedule.alpha(t)) / schedule.mask_prob(t)


def diffusion_nelbo(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, noise: NoiseConfig, mask_id: int, *,
                    attention_mask: Tensor | None = None, t: Tensor | None = None,
                    generator: torch.Generator | None = None,
                    masked_nll: Callable[[Tensor, Tensor, Tensor, int], Tensor] = subs_masked_nll) -> LossOutput:
    """Monte-Carlo estimate of the MDLM NELBO of ``x`` [B, L] with one time sample per sequence.

    ``denoiser(z_t, t)`` returns logits; SUBS is applied here. ``t`` may be given (continuous time only);
    otherwise it is drawn (antithetic if ``noise.antithetic``). Returns the loss per real token.
    ``masked_nll`` is ``subs_masked_nll`` or a compiled copy of it (see ``mdlm.train.parallelize``).
    """
    batch = x.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(x)
    if t is None:
        u = antithetic_uniform(batch, antithetic=noise.antithetic, generator=generator, device=x.device)
        if noise.time == "discrete":
            s, t = discrete_times(u, noise.num_timesteps)
            weight = noise.num_timesteps * discrete_nelbo_weight(schedule, s, t)
        else:
            t = continuous_times(u, noise.sampling_eps)
            weight = continuous_nelbo_weight(schedule, t)
    else:
        t = t.to(device=x.device, dtype=torch.float64)
        weight = continuous_nelbo_weight(schedule, t)
    z_t = forward_mask(x, t, schedule, mask_id, attention_mask=attention_mask, generator=generator)
    logits = denoiser(z_t, t.to(device=x.device, dtype=torch.float32))
    nll = masked_nll(logits, x, z_t, mask_id)
    per_sequence = nll.sum(dim=-1) * weight.to(device=x.device, dtype=nll.dtype)
    nll_sum = per_sequence.sum()
    num_tokens = attention_mask.sum().to(nll_sum.dtype)
    return LossOutput(loss=nll_sum / num_tokens.clamp_min(1), nll_sum=nll_sum, num_tokens=num_tokens)


def next_token_nll(logits: Tensor, x: Tensor, attention_mask: Tensor | None = None) -> LossOutput:
    """Autoregressive baseline: -log p(x^l | x^{<l}) summed over predicted real tokens (l >= 1)."""
    targets = x[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
    keep = torch.ones_like(targets) if attention_mask is None else attention_mask[:, 1:]
    keep = keep.to(nll.dtype).flatten()
    nll_sum = (nll * keep).sum()
    num_tokens = keep.sum()
    return LossOutput(loss=nll_sum / num_tokens.clamp_min(1), nll_sum=nll_sum, num_tokens=num_tokens)

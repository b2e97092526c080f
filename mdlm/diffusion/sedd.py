"""SEDD absorbing (Lou, Meng and Ermon 2024): score entropy and its reverse steps, on the MDLM forward process.

The network's output at a masked position, less log K (K real tokens, so that a zero output is uniform), is
o_y, and the model's concrete score is s_theta(z_t)_y = r_t exp(o_y) with r_t = alpha_t / (1 - alpha_t): the
absorbing-state scaling of the reference code (its ``- log(expm1(sigma))``, sigma_t = -log alpha_t). The
true score of a masked position is r_t p(x^l = y | z_t), so exp(o_y) estimates the denoising distribution,
without being forced to sum to one.

Diffusion-weighted denoising score entropy (SEDD Eq. 10 with the absorbing rate sigma'_t Q(y -> [MASK])), per
masked position with clean token x0; the true ratio is p_t(y | x0) / p_t([MASK] | x0) = r_t [y = x0]:

    sigma'_t ( sum_y s_y - r_t log s_x0 + K(r_t) ),   K(a) = a (log a - 1),   sigma'_t = -alpha'_t / alpha_t
  = w_t ( sum_y exp(o_y) - o_x0 - 1 ),               w_t = sigma'_t r_t = -alpha'_t / (1 - alpha_t).

Only masked positions contribute (an unmasked token's only forward move is to [MASK]). Its integral over t
bounds -log p_theta(x) (the prior term is 0: alpha_1 = 0 masks everything). Since sum exp(o) - 1 >= log sum
exp(o), each term is at least MDLM's w_t * -log softmax(o)_x0, with equality when the scores normalise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mdlm.diffusion.objective import continuous_nelbo_weight, reverse_unmask_prob
from mdlm.diffusion.schedules import NoiseSchedule


def log_ratios(logits: Tensor, mask_id: int) -> Tensor:
    """o = logits - log K with the [MASK] column at -inf, float32 [..., V]: the log-score less log r_t, i.e. the
    (unnormalised) log of the model's estimate of p(x^l = y | z_t) at a masked position."""
    o = logits.float() - math.log(logits.shape[-1] - 1)
    return o.index_fill(-1, torch.tensor([mask_id], device=o.device), float("-inf"))


def score_entropy(logits: Tensor, x: Tensor, z_t: Tensor, mask_id: int) -> Tensor:
    """sum_y exp(o_y) - o_{x0} - 1 at masked positions of z_t (0 elsewhere), [B, L] float32: SEDD's denoising
    score entropy of a masked position divided by its weight w_t (module docstring). It has the signature of
    ``subs_masked_nll``, so ``sequence_nelbo`` weights and averages it exactly as it does MDLM's term."""
    o = log_ratios(logits, mask_id)
    total = torch.logsumexp(o, dim=-1).exp()
    own = o.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    return torch.where(z_t == mask_id, total - own - 1.0, torch.zeros_like(total))


def analytic_unmask_prob(schedule: NoiseSchedule, s: Tensor, t: Tensor, log_mass: Tensor) -> Tensor:
    """P(a masked position is unmasked at s < t) in SEDD's analytic (Tweedie) step for the absorbing process.

    The step takes y with weight p exp(o_y) and stays masked with weight 1 - p, p = (alpha_s - alpha_t) /
    (1 - alpha_t), normalised: p Z / (1 - p + p Z) with Z = sum_y exp(o_y) = exp(``log_mass``). With
    normalised scores (Z = 1) it is MDLM's ancestral step."""
    p = reverse_unmask_prob(schedule, s, t).to(log_mass.device)
    mass = log_mass.double().exp()
    return p * mass / (1.0 - p + p * mass)


def euler_unmask_prob(schedule: NoiseSchedule, s: Tensor, t: Tensor, log_mass: Tensor) -> Tensor:
    """P(a masked position is unmasked at s < t) in SEDD's Euler step: the reverse rate [MASK] -> y is
    sigma'_t s_theta(z_t)_y = w_t exp(o_y), so over t - s the position leaves the mask with probability
    (t - s) w_t Z, clamped to 1 (and 1 at s = 0, where everything is unmasked)."""
    if float(s) <= 0.0:
        return torch.ones_like(log_mass, dtype=torch.float64)
    rate = continuous_nelbo_weight(schedule, t).to(log_mass.device) * log_mass.double().exp()
    return ((t - s).to(log_mass.device) * rate).clamp(max=1.0)

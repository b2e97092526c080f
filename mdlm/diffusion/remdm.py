"""ReMDM remasking (Wang et al. 2025, "Remasking Discrete Diffusion Models with Inference-Time Scaling",
arXiv 2503.00307): the reverse step of MDLM with a remasking probability sigma_t.

For s < t and the schedule's alpha, the ReMDM posterior with SUBS is

- z_t not [MASK]:  z_s ~ Cat((1 - sigma_t) x + sigma_t m): remask with probability sigma_t, else keep z_t;
- z_t = [MASK]:    z_s ~ Cat(((alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t)) x_theta
                             + ((1 - alpha_s - sigma_t alpha_t) / (1 - alpha_t)) m),

valid for 0 <= sigma_t <= sigma_t^max = min(1, (1 - alpha_s) / alpha_t). sigma_t = 0 is MDLM's ancestral step
(Eq. 7): the unmasking probability is then (alpha_s - alpha_t) / (1 - alpha_t). All arithmetic is float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm.config import REMASK_SCHEDULES
from mdlm.diffusion.schedules import NoiseSchedule

__all__ = ["remask_sigma", "remask_sigma_max", "remdm_unmask_prob"]


def remask_sigma_max(schedule: NoiseSchedule, s: Tensor, t: Tensor) -> Tensor:
    """sigma_t^max = min(1, (1 - alpha_s) / alpha_t), the largest remasking probability for which the posterior
    is a distribution; 1 at alpha_t = 0 (t = 1) and 0 at s = 0 (the last step unmasks everything)."""
    remaining = schedule.mask_prob(s)  # 1 - alpha_s
    alpha_t = schedule.alpha(t)
    ratio = torch.where(alpha_t > 0, remaining / alpha_t.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.ones_like(remaining))
    return torch.where(remaining > 0, ratio.clamp(max=1.0), torch.zeros_like(remaining))


def remask_sigma(schedule: NoiseSchedule, s: Tensor, t: Tensor, *, kind: str, eta: float) -> Tensor:
    """ReMDM's sigma_t schedules: 'cap' (max-capped) sigma_t = min(eta_cap, sigma_t^max); 'rescale'
    sigma_t = eta_rescale * sigma_t^max; ``eta`` in [0, 1]."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"remask_eta must be in [0, 1], got {eta}")
    sigma_max = remask_sigma_max(schedule, s, t)
    if kind == "cap":
        return sigma_max.clamp(max=eta)
    if kind == "rescale":
        return eta * sigma_max
    raise ValueError(f"remask_schedule must be one of {', '.join(REMASK_SCHEDULES)}, got {kind!r}")


def remdm_unmask_prob(schedule: NoiseSchedule, s: Tensor, t: Tensor, sigma: Tensor) -> Tensor:
    """(alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t): the probability that a position masked at t takes a
    token from x_theta at s (it stays masked otherwise, with (1 - alpha_s - sigma_t alpha_t) / (1 - alpha_t)).
    With sigma_t = 0 it is MDLM's (alpha_s - alpha_t) / (1 - alpha_t), to the last bit."""
    return (schedule.alpha(s) - (1.0 - sigma) * schedule.alpha(t)) / schedule.mask_prob(t)

"""D3PM absorbing (Austin et al. 2021): the T-step ELBO without MDLM's SUBS simplifications.

The network predicts x~_theta(x0 | z_t) as a softmax over the whole vocabulary, [MASK] included (no
zero-masking), and the reverse step is D3PM's x0-parameterisation p_theta(x_s | z_t) = sum_x0
q(x_s | z_t, x0) x~_theta(x0 | z_t). For the absorbing process, at a masked position and with
p = (alpha_s - alpha_t) / (1 - alpha_t) (the reverse unmasking probability, Eq. 7 of MDLM):

    q(x_s | z_t = m, x0)  : x0 with probability p, [MASK] with 1 - p
    p_theta(x_s | z_t = m): y with p x~(y) for a real token y, [MASK] with 1 - p + p x~(m)

so the KL of step t, per masked position, is

    KL_t = p (-log x~(x0)) + (1 - p) log((1 - p) / (1 - p + p x~(m))).

At an unmasked position both are the point mass on the token (an absorbing posterior cannot leave it): KL = 0.
The last step (t = 1/T, s = 0, p = 1) is the reconstruction term -log x~(x0); the prior term is 0 (alpha_1 = 0).
The ELBO bound of a sequence is sum_t E[sum_l KL_t] = T E_{t ~ U{1/T..1}}[sum_l KL_t], estimated on the same
draws as MDLM's (``noised_batches``). D3PM's optional auxiliary loss, lambda E[-log x~(x0 | z_t)] over every
real position (no carry-over), is added to the training loss only; the bound reported excludes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mdlm.config import NoiseConfig
from mdlm.diffusion.objective import (
    Generators,
    LossOutput,
    NoisedBatch,
    SequenceNLL,
    noised_batches,
    reverse_unmask_prob,
)
from mdlm.diffusion.schedules import NoiseSchedule

Backbone = Callable[..., Tensor]


def d3pm_step_kl(log_probs: Tensor, x: Tensor, sample: NoisedBatch, schedule: NoiseSchedule, mask_id: int) -> Tensor:
    """KL_t per position, [B, L] (0 at unmasked positions), from log x~_theta [B, L, V] (softmax over V with
    [MASK]) and the sample's (s, t)."""
    p = reverse_unmask_prob(schedule, sample.s, sample.t).to(log_probs.device)[:, None]  # [B, 1] float64
    log_x0 = log_probs.gather(-1, x.unsqueeze(-1)).squeeze(-1).double()
    x_mask = log_probs[..., mask_id].double().exp()
    stay = 1.0 - p
    safe = stay.clamp_min(1e-30)  # stay = 0 at s = 0: the term is 0, and so is its gradient
    stay_term = stay * (torch.log(safe) - torch.log(safe + p * x_mask))
    kl = p * -log_x0 + stay_term
    return torch.where(sample.z_t == mask_id, kl, torch.zeros_like(kl)).to(log_probs.dtype)


def d3pm_unmask_prob(schedule: NoiseSchedule, s: Tensor, t: Tensor, log_mass: Tensor) -> Tensor:
    """P(a masked position is unmasked at s < t) under p_theta: p (1 - x~([MASK])) = p exp(``log_mass``), with
    the token then drawn from x~ over the real tokens; 1 at the last step (s = 0)."""
    if float(s) <= 0.0:
        return torch.ones_like(log_mass, dtype=torch.float64)
    return reverse_unmask_prob(schedule, s, t).to(log_mass.device) * log_mass.double().exp()


@dataclass(frozen=True)
class D3PMObjective:
    """D3PM absorbing's T-step ELBO (``noise.time == 'discrete'``, T = ``noise.num_timesteps``), plus
    ``noise.aux_ce_weight`` times the auxiliary cross-entropy in the training loss."""

    schedule: NoiseSchedule
    noise: NoiseConfig
    mask_id: int
    metric = "nelbo"
    is_bound = True

    def __post_init__(self) -> None:
        if self.noise.time != "discrete":
            raise ValueError("D3PM's ELBO is a T-step bound: set noise.time=discrete (T = noise.num_timesteps)")

    def _terms(self, backbone: Backbone, x: Tensor, attention_mask: Tensor | None, mc_samples: int,
               generator: Generators) -> tuple[SequenceNLL, Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(x)
        columns, aux = [], torch.zeros((), device=x.device)
        for sample in noised_batches(x, self.schedule, self.noise, self.mask_id, attention_mask=attention_mask,
                                     mc_samples=mc_samples, generator=generator):
            logits = backbone(sample.z_t, sample.t.to(device=x.device, dtype=torch.float32), attention_mask)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            kl = d3pm_step_kl(log_probs, x, sample, self.schedule, self.mask_id)
            columns.append(kl.sum(dim=-1) * self.noise.num_timesteps)
            if self.noise.aux_ce_weight:
                ce = F.nll_loss(log_probs.flatten(0, -2), x.flatten(), reduction="none").view(x.shape)
                aux = aux + (ce * attention_mask).sum()
        out = SequenceNLL(nll=torch.stack(columns, dim=1), num_tokens=attention_mask.sum(dim=-1))
        return out, aux / mc_samples

    def sequence_nll(self, backbone: Backbone, x: Tensor, attention_mask: Tensor | None = None, *,
                     mc_samples: int = 1, generator: Generators = None) -> SequenceNLL:
        """Per-sequence ELBO terms [B, K]: T sum_l KL_t at K sampled steps."""
        return self._terms(backbone, x, attention_mask, mc_samples, generator)[0]

    def loss(self, backbone: Backbone, x: Tensor, attention_mask: Tensor | None = None, *,
             generator: torch.Generator | None = None) -> LossOutput:
        """The ELBO per real token (``nll_sum`` / ``num_tokens``), and, when ``noise.aux_ce_weight`` > 0, the
        training ``loss`` = ELBO + lambda * mean auxiliary cross-entropy per real token."""
        terms, aux = self._terms(backbone, x, attention_mask, 1, generator)
        out = terms.loss_output()
        if self.noise.aux_ce_weight:
            out = LossOutput(loss=out.loss + self.noise.aux_ce_weight * aux / out.num_tokens.clamp_min(1),
                             nll_sum=out.nll_sum, num_tokens=out.num_tokens)
        return out

    def compiled(self) -> D3PMObjective:
        return self

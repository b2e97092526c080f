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

import dataclasses
from collections.abc import Callable, Sequence
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


def zero_masked_nll(logits: Tensor, x: Tensor, z_t: Tensor, mask_id: int) -> Tensor:
    """-log <x_theta^l(z_t, t), x^l> at every position, [B, L] float32: zero-masking without carry-over (the
    paper's ablation). Unmasked positions are scored by the network's own prediction instead of a copy, which
    adds non-negative terms to the bound. (``sequence_nelbo`` keeps real positions only.)"""
    logits = logits.float()
    mask_column = torch.zeros(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    mask_column[mask_id] = float("-inf")
    return F.cross_entropy((logits + mask_column).flatten(0, -2), x.flatten(), reduction="none").view(x.shape)


def continuous_nelbo_weight(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """-alpha'_t / (1 - alpha_t): weight of the masked-token NLL in the continuous-time NELBO (Eq. 10)."""
    return -schedule.alpha_prime(t) / schedule.mask_prob(t)


def reverse_unmask_prob(schedule: NoiseSchedule, s: Tensor, t: Tensor) -> Tensor:
    """(alpha_s - alpha_t) / (1 - alpha_t) for s < t.

    Two readings of one quantity: the chance that a position masked at t is unmasked at s in the reverse
    step (Eq. 7 with SUBS; the samplers use it), and the weight of the masked-token NLL in step t of the
    T-step NELBO (Eq. 8, times T).
    """
    return (schedule.alpha(s) - schedule.alpha(t)) / schedule.mask_prob(t)


Generators = torch.Generator | Sequence[torch.Generator] | None
MaskedNLL = Callable[[Tensor, Tensor, Tensor, int], Tensor]


@dataclass
class SequenceNLL:
    """Per-sequence estimates: ``nll`` [B, K] (K Monte-Carlo NELBO terms, or K copies of an exact NLL) and the
    number of real tokens each sequence is normalised by, ``num_tokens`` [B]."""

    nll: Tensor
    num_tokens: Tensor

    def loss_output(self) -> LossOutput:
        """The batch objective per real token: sum_b mean_k nll_bk / sum_b n_b."""
        nll_sum = self.nll.mean(dim=1).sum()
        num_tokens = self.num_tokens.sum().to(nll_sum.dtype)
        return LossOutput(loss=nll_sum / num_tokens.clamp_min(1), nll_sum=nll_sum, num_tokens=num_tokens)


@dataclass(frozen=True)
class NoisedBatch:
    """One Monte-Carlo sample of the forward process for a batch: times and z_t ~ q(z_t | x)."""

    t: Tensor  # [B] float64
    s: Tensor | None  # [B] float64, t - 1/T in discrete time; None in continuous time
    z_t: Tensor  # [B, L]


def noised_batches(x: Tensor, schedule: NoiseSchedule, noise: NoiseConfig, mask_id: int, *,
                   attention_mask: Tensor, mc_samples: int = 1, t: Tensor | None = None,
                   generator: Generators = None) -> list[NoisedBatch]:
    """K forward-process samples of ``x`` [B, L], the draws every NELBO estimator here shares.

    Times: one antithetic grid ``(u + j / (B K)) mod 1`` over the B K samples (i.i.d. if ``noise.antithetic``
    is off; sample k of row b takes index k B + b), mapped to t ~ U[eps, 1] (continuous) or to the grid
    {1/T, ..., 1} with s = t - 1/T (``noise.time == 'discrete'``); then one forward mask per sample.
    ``generator`` may be one generator, or a sequence of B generators: row b then draws its K times and masks
    from ``generators[b]`` alone, exactly as a call on that row by itself (batch composition does not matter).
    ``t`` [B] may be given instead (continuous time, K = 1).
    """
    batch = x.shape[0]
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    per_row = generator is not None and not isinstance(generator, torch.Generator)
    if per_row and len(generator) != batch:  # type: ignore[arg-type]
        raise ValueError(f"{len(generator)} generators for {batch} rows")  # type: ignore[arg-type]
    if t is not None:
        if mc_samples != 1:
            raise ValueError("a given t allows one sample per sequence (mc_samples=1)")
        times: list[tuple[Tensor | None, Tensor]] = [(None, t.to(device=x.device, dtype=torch.float64))]
    else:
        if per_row:
            u = torch.stack([antithetic_uniform(mc_samples, antithetic=noise.antithetic, generator=g,
                                                device=x.device) for g in generator], dim=1)  # type: ignore[union-attr]
        else:
            u = antithetic_uniform(batch * mc_samples, antithetic=noise.antithetic, generator=generator,  # type: ignore[arg-type]
                                   device=x.device).view(mc_samples, batch)
        if noise.time == "discrete":
            times = [discrete_times(u[k], noise.num_timesteps) for k in range(mc_samples)]
        else:
            times = [(None, continuous_times(u[k], noise.sampling_eps)) for k in range(mc_samples)]
    samples = []
    for s_k, t_k in times:
        if per_row:
            z_t = torch.cat([forward_mask(x[b:b + 1], t_k[b:b + 1], schedule, mask_id,
                                          attention_mask=attention_mask[b:b + 1], generator=g)
                             for b, g in enumerate(generator)])  # type: ignore[arg-type]
        else:
            z_t = forward_mask(x, t_k, schedule, mask_id, attention_mask=attention_mask,
                               generator=generator)  # type: ignore[arg-type]
        samples.append(NoisedBatch(t=t_k, s=s_k, z_t=z_t))
    return samples


def nelbo_weight(schedule: NoiseSchedule, sample: NoisedBatch, num_timesteps: int) -> Tensor:
    """The weight of the masked-token NLL of ``sample``: -alpha'_t / (1 - alpha_t) in continuous time (Eq. 10),
    T (alpha_s - alpha_t) / (1 - alpha_t) in T-step discrete time (Eq. 8)."""
    if sample.s is None:
        return continuous_nelbo_weight(schedule, sample.t)
    return num_timesteps * reverse_unmask_prob(schedule, sample.s, sample.t)


def sequence_nelbo(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, noise: NoiseConfig, mask_id: int, *,
                   attention_mask: Tensor | None = None, mc_samples: int = 1, t: Tensor | None = None,
                   generator: Generators = None, masked_nll: MaskedNLL = subs_masked_nll) -> SequenceNLL:
    """K Monte-Carlo estimates of the MDLM NELBO of each sequence of ``x`` [B, L] (Eq. 10, or Eq. 8 in discrete
    time): ``w(t) * sum_{l : z_t^l = m} -log <x_theta^l(z_t, t), x^l>`` per sequence and time sample, on the
    draws of :func:`noised_batches`.

    ``denoiser(z_t, t)`` returns logits; ``masked_nll`` turns them into the per-position term at masked
    positions: SUBS (``subs_masked_nll``, or a compiled copy), or SEDD's score entropy
    (:func:`mdlm.diffusion.sedd.score_entropy`), which shares this estimator and weight.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(x)
    columns = []
    for sample in noised_batches(x, schedule, noise, mask_id, attention_mask=attention_mask, mc_samples=mc_samples,
                                 t=t, generator=generator):
        nll = masked_nll(denoiser(sample.z_t, sample.t.to(device=x.device, dtype=torch.float32)), x, sample.z_t,
                         mask_id) * attention_mask
        weight = nelbo_weight(schedule, sample, noise.num_timesteps)
        columns.append(nll.sum(dim=-1) * weight.to(device=x.device, dtype=nll.dtype))
    return SequenceNLL(nll=torch.stack(columns, dim=1), num_tokens=attention_mask.sum(dim=-1))


def diffusion_nelbo(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, noise: NoiseConfig, mask_id: int, *,
                    attention_mask: Tensor | None = None, t: Tensor | None = None,
                    generator: torch.Generator | None = None,
                    masked_nll: MaskedNLL = subs_masked_nll) -> LossOutput:
    """Monte-Carlo estimate of the MDLM NELBO of ``x`` [B, L] per real token, one time sample per sequence:
    :func:`sequence_nelbo` with K = 1, summed over the batch."""
    return sequence_nelbo(denoiser, x, schedule, noise, mask_id, attention_mask=attention_mask, t=t,
                          generator=generator, masked_nll=masked_nll).loss_output()


def sequence_next_token_nll(logits: Tensor, x: Tensor, attention_mask: Tensor | None = None) -> SequenceNLL:
    """Autoregressive baseline, per sequence: sum over predicted real tokens (l >= 1) of -log p(x^l | x^{<l})
    ([B, 1]), and the number of those tokens (one less than the row's real tokens)."""
    targets = x[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
    keep = (torch.ones_like(targets) if attention_mask is None else attention_mask[:, 1:]).to(nll.dtype)
    per_sequence = (nll.view(targets.shape) * keep).sum(dim=-1)
    return SequenceNLL(nll=per_sequence[:, None], num_tokens=keep.sum(dim=-1))


def next_token_nll(logits: Tensor, x: Tensor, attention_mask: Tensor | None = None) -> LossOutput:
    """Autoregressive baseline: -log p(x^l | x^{<l}) summed over predicted real tokens (l >= 1), per token."""
    return sequence_next_token_nll(logits, x, attention_mask).loss_output()


Backbone = Callable[..., Tensor]  # (tokens [B, L], t [B] | None, attention_mask [B, L] | None) -> logits [B, L, V]


@dataclass(frozen=True)
class MaskedDiffusionObjective:
    """The MDLM objective of a backbone: the NELBO with SUBS under ``schedule`` and ``noise``.

    What the training loops, validation, evaluation and serving call. ``masked_nll`` is the kernel over the
    vocabulary; :meth:`compiled` returns a copy with it under ``torch.compile`` (the model is not changed).
    """

    schedule: NoiseSchedule
    noise: NoiseConfig
    mask_id: int
    masked_nll: MaskedNLL = subs_masked_nll
    metric = "nelbo"  # what the number is called in logs
    is_bound = True  # an upper bound on the NLL

    def sequence_nll(self, backbone: Backbone, x: Tensor, attention_mask: Tensor | None = None, *,
                     mc_samples: int = 1, generator: Generators = None, t: Tensor | None = None) -> SequenceNLL:
        """Per-sequence NELBO terms [B, K] (see :func:`sequence_nelbo`)."""
        return sequence_nelbo(lambda z, tt: backbone(z, tt, attention_mask), x, self.schedule, self.noise,
                              self.mask_id, attention_mask=attention_mask, mc_samples=mc_samples, t=t,
                              generator=generator, masked_nll=self.masked_nll)

    def loss(self, backbone: Backbone, x: Tensor, attention_mask: Tensor | None = None, *,
             generator: torch.Generator | None = None, t: Tensor | None = None) -> LossOutput:
        """One-sample NELBO per real token (exp of it bounds the perplexity)."""
        return diffusion_nelbo(lambda z, tt: backbone(z, tt, attention_mask), x, self.schedule, self.noise,
                               self.mask_id, attention_mask=attention_mask, t=t, generator=generator,
                               masked_nll=self.masked_nll)

    def compiled(self) -> MaskedDiffusionObjective:
        """The same objective with the masked NLL under ``torch.compile`` (fp32 cast, [MASK] column, log-softmax
        and their backward fuse)."""
        return dataclasses.replace(self, masked_nll=torch.compile(self.masked_nll))


@dataclass(frozen=True)
class NextTokenObjective:
    """The AR baseline's objective: the exact next-token NLL (no randomness: no generator, no time)."""

    metric = "nll"
    is_bound = False

    def sequence_nll(self, backbone: Backbone, x: Tensor, attention_mask: Tensor | None = None, *,
                     mc_samples: int = 1, generator: Generators = None) -> SequenceNLL:
        """The exact NLL per sequence, repeated in each of the K columns (``generator`` draws nothing: the
        parameter keeps one signature for both objectives)."""
        out = sequence_next_token_nll(backbone(x, None, attention_mask), x, attention_mask)
        return SequenceNLL(nll=out.nll.expand(-1, mc_samples), num_tokens=out.num_tokens)

    def loss(self, backbone: Backbone, x: Tensor, attention_mask: Tensor | None = None, *,
             generator: torch.Generator | None = None) -> LossOutput:
        """Next-token NLL per predicted real token."""
        return next_token_nll(backbone(x, None, attention_mask), x, attention_mask)

    def compiled(self) -> NextTokenObjective:
        return self


Objective = MaskedDiffusionObjective | NextTokenObjective

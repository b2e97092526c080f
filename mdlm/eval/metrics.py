"""Evaluation metrics: per-sequence NELBO, its corpus summary with a standard error, sample entropy and
generative perplexity. Pure functions on tensors and arrays; no Ray, no files.

The per-sequence NELBO is the training objective itself (:func:`mdlm.diffusion.objective.sequence_nelbo`,
Eq. 10 / Eq. 8 of Sahoo et al. 2024, through ``model.sequence_nll``); this module adds the corpus summary
(ratio estimator, standard errors, perplexity bound) and the sample metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import Tensor

MAX_LOG_PPL = 700.0  # exp() of more overflows a float64; perplexities are reported as inf beyond it

ArrayLike = Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]


def safe_exp(x: float) -> float:
    """exp(x), or inf where it would overflow (NaN stays NaN)."""
    return math.exp(x) if not x > MAX_LOG_PPL else math.inf


# ---------------------------------------------------------------------------------------------------------
# Per-sequence NELBO


def sequence_nll(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, mc_samples: int = 1,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None) -> tuple[Tensor, Tensor]:
    """Per-sequence NELBO (MDLM) or NLL (AR) in nats: ``(nll [B, K] float64, num_tokens [B] float64)``.

    The model's own objective (``model.sequence_nll``, i.e. :func:`mdlm.diffusion.objective.sequence_nelbo`
    for MDLM with its ``noise_config``), the one its training loss is: with K = 1 and the same generator state,
    ``nll.sum() / num_tokens.sum()`` equals ``model.loss(input_ids, attention_mask, generator=g).loss``.
    ``generator`` may be a sequence of B generators, one per row (batch composition then does not matter).
    AR: the exact next-token NLL over predicted real tokens (positions >= 1), repeated in the K columns.
    This adds input checks and moves the inputs to the model's device.
    """
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    device = next(model.parameters()).device
    x = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if x.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(x.shape)}")
    mask = torch.ones_like(x) if attention_mask is None else torch.as_tensor(attention_mask, device=device).long()
    if mask.shape != x.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(x.shape)}")
    out = model.sequence_nll(x, mask, mc_samples=mc_samples, generator=generator)
    return out.nll.double().contiguous(), out.num_tokens.double()


def row_seed(seed: int, row_index: int) -> int:
    """A 64-bit generator seed for row ``row_index`` of an evaluation seeded with ``seed`` (well mixed, so that
    neighbouring rows and seeds draw unrelated streams)."""
    return int(np.random.SeedSequence([int(seed), int(row_index)]).generate_state(1, np.uint64)[0])


def row_generators(seed: int, row_indices: Sequence[int] | np.ndarray) -> list[torch.Generator]:
    """One CPU generator per row, seeded by :func:`row_seed` (CPU draws are the same whatever the model's device)."""
    return [torch.Generator().manual_seed(row_seed(seed, int(i))) for i in row_indices]


# ---------------------------------------------------------------------------------------------------------
# Corpus summary


@dataclass
class NelboSummary:
    """A corpus NELBO (or NLL) per token with its standard error and the perplexity (bound) interval."""

    nelbo: float  # sum_i mean_k nll_ik / sum_i n_i, nats per token
    se: float  # ratio-estimator (delta-method) standard error over sequences; includes the Monte-Carlo noise
    mc_se: float | None  # the Monte-Carlo part alone, for this fixed set of sequences (needs K >= 2)
    ppl: float  # exp(nelbo): a perplexity upper bound for MDLM, the perplexity for an AR model
    ppl_low: float  # exp(nelbo -/+ z * se) at ``confidence``
    ppl_high: float
    confidence: float
    num_sequences: int
    num_tokens: int
    mc_samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_2d(nll: ArrayLike) -> np.ndarray:
    array = nll.detach().cpu().double().numpy() if isinstance(nll, Tensor) else np.asarray(nll, dtype=np.float64)
    return array[:, None] if array.ndim == 1 else array


def summarize_nelbo(nll: ArrayLike, num_tokens: ArrayLike, *, confidence: float = 0.95) -> NelboSummary:
    """Corpus NELBO per token from per-sequence sums ``nll`` [N, K] (or [N]) and token counts ``num_tokens`` [N].

    With y_i = mean_k nll_ik and n_i tokens, the estimate is the ratio R = sum y_i / sum n_i. Its standard
    error over sequences is the delta-method (ratio-estimator) one,
    ``se = sqrt(N / (N - 1) * sum_i (y_i - R n_i)^2) / sum_i n_i``, which counts both the spread between
    sequences and the Monte-Carlo noise in each y_i (valid when rows draw independent noise; rows sharing one
    antithetic batch are negatively correlated and make it conservative). ``mc_se`` is the Monte-Carlo part
    alone, ``sqrt(sum_i s_i^2 / K) / sum_i n_i`` with s_i^2 the sample variance over the K estimates of row i
    (conservative for antithetic times). The perplexity interval is exp(R -/+ z se)."""
    values = _as_2d(nll)
    tokens = _as_2d(num_tokens)[:, 0]
    if values.ndim != 2 or values.shape[0] != tokens.shape[0]:
        raise ValueError(f"nll {values.shape} and num_tokens {tokens.shape} do not match")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n, k = values.shape
    total = float(tokens.sum())
    if n == 0 or total <= 0:
        raise ValueError("no tokens to evaluate")
    y = values.mean(axis=1)
    ratio = float(y.sum() / total)
    se = math.sqrt(n / (n - 1) * float(np.sum((y - ratio * tokens) ** 2))) / total if n > 1 else math.nan
    mc_se = math.sqrt(float(values.var(axis=1, ddof=1).sum()) / k) / total if k > 1 else None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    spread = z * se if math.isfinite(se) else math.nan
    return NelboSummary(nelbo=ratio, se=se, mc_se=mc_se, ppl=safe_exp(ratio), ppl_low=safe_exp(ratio - spread),
                        ppl_high=safe_exp(ratio + spread), confidence=confidence, num_sequences=n,
                        num_tokens=round(total), mc_samples=k)


# ---------------------------------------------------------------------------------------------------------
# Samples


def unigram_entropy(token_ids: Tensor | np.ndarray | Sequence[Sequence[int]]) -> tuple[list[float], float]:
    """Entropy in nats of each sample's empirical token distribution, -sum_v p_v log p_v with p_v the share of
    token v in the sample, and their mean. Low entropy flags repetitive samples, which flatter generative
    perplexity (Zheng et al. 2024); report it next to it. Empty samples have entropy 0."""
    rows = token_ids.tolist() if isinstance(token_ids, (Tensor, np.ndarray)) else [list(r) for r in token_ids]
    entropies = []
    for row in rows:
        if not row:
            entropies.append(0.0)
            continue
        _, counts = np.unique(np.asarray(row, dtype=np.int64), return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()) + 0.0)
    return entropies, float(np.mean(entropies)) if entropies else math.nan


def generative_perplexity(nll_sums: ArrayLike, num_tokens: ArrayLike) -> float:
    """exp(sum_i NLL_i / sum_i n_i): perplexity of generated texts under an autoregressive evaluator, with
    NLL_i the evaluator's summed next-token NLL of text i and n_i its number of scored tokens (token-weighted)."""
    total = float(np.sum(_as_2d(num_tokens)))
    if total <= 0:
        raise ValueError("no scored tokens")
    return safe_exp(float(np.sum(_as_2d(nll_sums))) / total)

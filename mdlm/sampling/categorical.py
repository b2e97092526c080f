"""Categorical draws for the samplers: Gumbel-max in a chosen precision, nucleus (top-p) filtering.

Precision matters: with float32 uniforms the Gumbel noise -log(-log u) is capped near 16.6, so a token
whose log-probability trails the best one by more than that can never be drawn. That truncation lowers
the effective temperature, reduces diversity and flatters generative perplexity (Zheng et al. 2024,
arXiv 2409.02908). float64 moves the cap to about 37 nats, and is the default everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mdlm.rng import uniform

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"sampling dtype must be float64 or float32, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"sampling dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def gumbel_noise(shape: torch.Size | tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str,
                 generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise -log(-log u), u ~ U[0, 1) drawn in ``dtype``."""
    u = uniform(shape, dtype=dtype, device=device, generator=generator)
    return -torch.log(-torch.log(u))


def sample_categorical(probs: Tensor, *, dtype: str | torch.dtype = torch.float64,
                       generator: torch.Generator | None = None) -> Tensor:
    """Draw one index per row of ``probs`` [..., V] (unnormalised is fine) by Gumbel-max in ``dtype``."""
    dtype = resolve_dtype(dtype)
    log_p = torch.log(probs.to(dtype))
    noise = gumbel_noise(log_p.shape, dtype=dtype, device=log_p.device, generator=generator)
    return torch.argmax(log_p + noise, dim=-1)


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches ``top_p``;
    renormalise. ``top_p = 1`` returns ``probs`` unchanged."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    total = sorted_probs.sum(dim=-1, keepdim=True)
    keep_sorted = mass_before < top_p * total  # the first token always passes (mass_before = 0)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = torch.where(keep, probs, torch.zeros_like(probs))
    return filtered / filtered.sum(dim=-1, keepdim=True)


def token_probs(log_probs: Tensor, top_p: float, dtype: torch.dtype) -> Tensor:
    """What a sampler draws a token from: exp(``log_probs``) in ``dtype``, nucleus-filtered to ``top_p``."""
    return top_p_filter(log_probs.to(dtype).exp(), top_p)

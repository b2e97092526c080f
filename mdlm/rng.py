"""Seeded uniform draws that work with a generator on any device."""

from __future__ import annotations

import torch
from torch import Tensor


def uniform(shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype, device: torch.device | str,
            generator: torch.Generator | None = None) -> Tensor:
    """U[0, 1) samples of ``shape`` on ``device``, drawn on the generator's own device (a CPU generator can
    feed a GPU run and vice versa)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, dtype=dtype, device=where, generator=generator).to(device)

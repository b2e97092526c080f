"""What every sampler shares: the denoiser and callback signatures and the output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

Denoise = Callable[[Tensor, Tensor], Tensor]  # (z [B, L], t [B]) -> SUBS log-probs [B, L, V]
StepCallback = Callable[[int, Tensor], None]  # (step index, current z [B, L])


@dataclass
class SampleOutput:
    tokens: Tensor  # [B, L]
    num_forward_passes: int

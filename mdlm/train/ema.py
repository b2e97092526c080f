"""Exponential moving average of model weights, swappable into the model for evaluation and sampling.

decay_n = min(decay, (1 + n) / (10 + n)) after n updates (the warm-up used by the reference code), so
early averages are not dominated by the random initialisation. Shadow tensors are created with
``detach().clone()``, so they take the same layout as the parameters (sharded DTensors under FSDP2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone().float() for name, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        """min(decay, (1 + n) / (10 + n)) for the next update."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Use the averaged weights inside the block; the training weights are restored on exit."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = set(self.shadow) - set(shadow)
        unexpected = set(shadow) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.num_updates = int(state["num_updates"])  # type: ignore[arg-type]
        with torch.no_grad():
            for name, value in shadow.items():
                self.shadow[name].copy_(value)

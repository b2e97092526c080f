"""Noise schedules of the absorbing-state forward process.

A schedule gives alpha_t (the probability that a token is still itself at time t), its derivative
alpha'_t, and 1 - alpha_t (the masking probability), for t in [0, 1] with alpha_0 = 1 and alpha_1 = 0
exactly, so the forward process ends with every token masked (MDLM, Sec. 3.1).

``1 - alpha_t`` is computed by its own formula, not by subtraction, so that the NELBO weight
alpha'_t / (1 - alpha_t) stays accurate near t = 0 in any precision. All arithmetic is float64.

The reference code defines 'linear' and 'geometric' through a total noise sigma(t) with
alpha_t = exp(-sigma(t)), which never reaches 0 at t = 1; here they are rescaled to end at exactly 0,
``alpha_t = (exp(-sigma(t)) - exp(-sigma(1))) / (exp(-sigma(0)) - exp(-sigma(1)))``, the same shape
with an exact endpoint.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from mdlm.config import ConfigError, NoiseConfig


class NoiseSchedule(ABC):
    """alpha_t, alpha'_t and 1 - alpha_t as functions of t in [0, 1]."""

    name: str

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """alpha_t: probability that a token is unmasked at time t."""

    @abstractmethod
    def alpha_prime(self, t: Tensor) -> Tensor:
        """d alpha_t / dt (<= 0)."""

    @abstractmethod
    def mask_prob(self, t: Tensor) -> Tensor:
        """1 - alpha_t: probability that a token is [MASK] at time t."""

    def inverse_mask_prob(self, p: Tensor) -> Tensor:
        """The t with 1 - alpha_t = p (bisection; schedules with a closed form override it)."""
        p = _f64(p)
        lo, hi = torch.zeros_like(p), torch.ones_like(p)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = self.mask_prob(mid) < p
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _f64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class LogLinearSchedule(NoiseSchedule):
    """alpha_t = 1 - t (total noise sigma(t) = -log(1 - t)); the paper's default, weight -1/t."""

    name = "loglinear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - _f64(t)

    def alpha_prime(self, t: Tensor) -> Tensor:
        return torch.full_like(_f64(t), -1.0)

    def mask_prob(self, t: Tensor) -> Tensor:
        return _f64(t).clone()

    def inverse_mask_prob(self, p: Tensor) -> Tensor:
        return _f64(p).clone()


class CosineSchedule(NoiseSchedule):
    """alpha_t = cos(pi t / 2)."""

    name = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * _f64(t)).clamp_min(0.0)

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * _f64(t))

    def mask_prob(self, t: Tensor) -> Tensor:
        return 2.0 * torch.sin(0.25 * math.pi * _f64(t)) ** 2  # 1 - cos(x) = 2 sin^2(x / 2)

    def inverse_mask_prob(self, p: Tensor) -> Tensor:
        return (4.0 / math.pi) * torch.asin(torch.sqrt(_f64(p).clamp(0.0, 1.0) / 2.0))


class CosineSquaredSchedule(NoiseSchedule):
    """alpha_t = cos^2(pi t / 2)."""

    name = "cosinesqr"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * _f64(t)) ** 2

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(math.pi * _f64(t))

    def mask_prob(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * _f64(t)) ** 2

    def inverse_mask_prob(self, p: Tensor) -> Tensor:
        return (2.0 / math.pi) * torch.asin(torch.sqrt(_f64(p).clamp(0.0, 1.0)))


class _SigmaSchedule(NoiseSchedule):
    """alpha_t = (exp(-sigma(t)) - exp(-sigma(1))) / (exp(-sigma(0)) - exp(-sigma(1)))."""

    def __init__(self, sigma_min: float, sigma_max: float) -> None:
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        s0, s1 = self.sigma(_f64(0.0)), self.sigma(_f64(1.0))
        self._s0 = float(s0)
        # Z = exp(-s0) - exp(-s1) = exp(-s0) * (-expm1(-(s1 - s0)))
        self._log_z = -self._s0 + math.log(-math.expm1(-(float(s1) - self._s0)))
        self._s1 = float(s1)

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma_prime(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        s = self.sigma(_f64(t))
        # exp(-s) - exp(-s1) = exp(-s) * (-expm1(-(s1 - s)))
        return torch.exp(-s - self._log_z) * (-torch.expm1(-(self._s1 - s)))

    def alpha_prime(self, t: Tensor) -> Tensor:
        t = _f64(t)
        return -self.sigma_prime(t) * torch.exp(-self.sigma(t) - self._log_z)

    def mask_prob(self, t: Tensor) -> Tensor:
        s = self.sigma(_f64(t))
        # exp(-s0) - exp(-s) = exp(-s0) * (-expm1(-(s - s0)))
        return math.exp(-self._s0 - self._log_z) * (-torch.expm1(-(s - self._s0)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class LinearSchedule(_SigmaSchedule):
    """Total noise linear in t: sigma(t) = sigma_min + t (sigma_max - sigma_min) (reference: 0 and 10)."""

    name = "linear"

    def __init__(self, sigma_min: float = 0.0, sigma_max: float = 10.0) -> None:
        super().__init__(sigma_min, sigma_max)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min + _f64(t) * (self.sigma_max - self.sigma_min)

    def sigma_prime(self, t: Tensor) -> Tensor:
        return torch.full_like(_f64(t), self.sigma_max - self.sigma_min)


class GeometricSchedule(_SigmaSchedule):
    """Total noise geometric in t: sigma(t) = sigma_min^(1 - t) sigma_max^t (SEDD's: 1e-4 and 20)."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        super().__init__(sigma_min, sigma_max)

    def sigma(self, t: Tensor) -> Tensor:
        t = _f64(t)
        return self.sigma_min ** (1.0 - t) * self.sigma_max ** t

    def sigma_prime(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)


SCHEDULES: dict[str, type[NoiseSchedule]] = {
    cls.name: cls for cls in (LogLinearSchedule, LinearSchedule, CosineSchedule, CosineSquaredSchedule,
                              GeometricSchedule)
}


def get_schedule(config: NoiseConfig | str) -> NoiseSchedule:
    """Build the schedule named in ``config`` (a NoiseConfig or a schedule name)."""
    if isinstance(config, str):
        config = NoiseConfig(schedule=config)  # type: ignore[arg-type]
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"noise.schedule: unknown schedule {config.schedule!r}; "
                          f"available: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[config.schedule]
    if issubclass(cls, _SigmaSchedule):
        kwargs = {k: getattr(config, k) for k in ("sigma_min", "sigma_max") if getattr(config, k) is not None}
        if cls is LinearSchedule and config.sigma_min is None:
            kwargs.setdefault("sigma_min", 0.0)
        return cls(**kwargs)
    return cls()

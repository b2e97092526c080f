"""mdlm: masked diffusion language models (Sahoo et al. 2024) from a laptop to a Ray cluster."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Attributes load on first use, so that ``import mdlm.data...`` (e.g. in a Ray Data worker) does not import torch.
_LAZY = {
    "Config": "mdlm.config", "ConfigError": "mdlm.config", "ModelConfig": "mdlm.config",
    "NoiseConfig": "mdlm.config", "load_config": "mdlm.config", "model_config_for": "mdlm.config",
    "MDLM": "mdlm.modeling", "ARModel": "mdlm.modeling", "build_model": "mdlm.modeling",
    "load_pretrained": "mdlm.modeling", "ModelCardInfo": "mdlm.model_card",
}

__all__ = [
    "MDLM",
    "ARModel",
    "Config",
    "ConfigError",
    "ModelCardInfo",
    "ModelConfig",
    "NoiseConfig",
    "build_model",
    "load_config",
    "load_pretrained",
    "model_config_for",
]

if TYPE_CHECKING:
    from mdlm.config import Config, ConfigError, ModelConfig, NoiseConfig, load_config, model_config_for
    from mdlm.model_card import ModelCardInfo
    from mdlm.modeling import MDLM, ARModel, build_model, load_pretrained


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mdlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

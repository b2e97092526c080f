"""mdlm: masked diffusion language models (Sahoo et al. 2024) from a laptop to a Ray cluster."""

from mdlm.config import Config, ConfigError, ModelConfig, NoiseConfig, load_config, model_config_for
from mdlm.modeling import MDLM, ARModel, build_model, load_pretrained

__version__ = "0.1.0"

__all__ = [
    "MDLM",
    "ARModel",
    "Config",
    "ConfigError",
    "ModelConfig",
    "NoiseConfig",
    "build_model",
    "load_config",
    "load_pretrained",
    "model_config_for",
]

"""``save_pretrained`` / ``from_pretrained`` in the layout users expect from Hugging Face.

A model directory holds ``config.json`` (model type, model and noise config), ``model.safetensors`` (the
weights; loading never unpickles anything) and, when the model carries one, ``tokenizer.json``.
Saving writes into a temporary sibling directory and renames it into place, so a crash never leaves a
half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from mdlm.config import ConfigError, ModelConfig, NoiseConfig, _section_from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 1


def write_model_dir(path: str | os.PathLike[str], *, model_type: str, model_config: ModelConfig,
                    noise_config: NoiseConfig | None, state_dict: dict[str, torch.Tensor],
                    tokenizer: Tokenizer | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a model directory atomically (temp dir, then rename over any previous one)."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        config = {
            "model_type": model_type,
            "format_version": FORMAT_VERSION,
            "model": asdict(model_config),
            "noise": asdict(noise_config) if noise_config is not None else None,
            **(extra or {}),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "model_type": model_type})
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER_NAME))
        if target.exists():
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)  # put the previous model back
        raise
    return target


def resolve_model_dir(uri: str | os.PathLike[str]) -> Path:
    """A local directory for ``uri``: a local path as is; an MLflow URI (``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/ID/model``) downloaded by MLflow (tracking URI from
    ``MLFLOW_TRACKING_URI``); any other fsspec URL (``s3://``, ``gs://``, ``file://``...) copied to a temp dir."""
    text = str(uri)
    if text.startswith(("models:/", "runs:/")):
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(text))
    if "://" in text:
        import fsspec

        fs, remote = fsspec.core.url_to_fs(text)
        if not fs.isdir(remote):
            raise FileNotFoundError(f"model directory not found: {text}")
        local = Path(tempfile.mkdtemp(prefix="mdlm-model-"))
        for name in (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME):
            source = f"{remote.rstrip('/')}/{name}"
            if fs.exists(source):
                fs.get(source, str(local / name))
        return local
    return Path(text)


def read_model_dir(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a model directory (local path or URI, see ``resolve_model_dir``): config sections,
    weights (safetensors) and tokenizer."""
    root = resolve_model_dir(path)
    config_path = root / CONFIG_NAME
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a model saved with save_pretrained")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_path}: invalid JSON: {exc}") from None
    model_type = raw.get("model_type")
    if model_type not in ("mdlm", "ar"):
        raise ConfigError(f"{config_path}: model_type must be 'mdlm' or 'ar', got {model_type!r}")
    model_config = _section_from_dict(ModelConfig, raw.get("model") or {}, "model")
    model_config.validate()
    noise_config = None
    if raw.get("noise") is not None:
        noise_config = _section_from_dict(NoiseConfig, raw["noise"], "noise")
        noise_config.validate()
    weights_path = root / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    state_dict = load_file(str(weights_path), device=str(map_location))
    tokenizer_path = root / TOKENIZER_NAME
    tokenizer = Tokenizer.from_file(str(tokenizer_path)) if tokenizer_path.is_file() else None
    return {"model_type": model_type, "model_config": model_config, "noise_config": noise_config,
            "state_dict": state_dict, "tokenizer": tokenizer, "raw_config": raw}

"""``save_pretrained`` / ``from_pretrained`` in the layout users expect from Hugging Face.

A model directory holds ``config.json`` (model type, model and noise config), ``model.safetensors`` (the
weights; loading never unpickles anything), a model card ``README.md`` and, when the model carries one,
``tokenizer.json`` with ``tokenizer_config.json`` and ``special_tokens_map.json`` (so that
``transformers.AutoTokenizer.from_pretrained(directory)`` loads it). Saving writes into a temporary sibling
directory and swaps it into place (:func:`mdlm.storage.atomic_dir`), so a crash never leaves a half-written model.
A directory is found by local path, MLflow URI, fsspec URL or Hugging Face Hub repo id (:func:`resolve_model_dir`).
:func:`read_model_config` reads and validates ``config.json`` alone (no weights), for checks before loading.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from mdlm.config import MODEL_KINDS, ConfigError, ModelConfig, NoiseConfig, dataclass_from_dict
from mdlm.data.tokenizer import TOKENIZER_FILE as TOKENIZER_NAME
from mdlm.data.tokenizer import TOKENIZER_FILES, model_role_ids, save_tokenizer
from mdlm.hf_hub import download_repo, is_repo_id
from mdlm.model_card import CARD_NAME, ModelCardInfo, render_model_card
from mdlm.storage import atomic_dir, is_mlflow_uri, is_url

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, *TOKENIZER_FILES, CARD_NAME)  # everything a model directory may hold
FORMAT_VERSION = 1
MLFLOW_MODEL_ARTIFACT = "model"  # the model directory inside an MLflow pyfunc model: artifacts/model/


@dataclass(frozen=True)
class ModelDirConfig:
    """A model directory's ``config.json``, validated."""

    model_type: str  # 'mdlm' or 'ar'
    model_config: ModelConfig
    noise_config: NoiseConfig | None
    raw: dict[str, Any]  # the JSON as written


def write_model_dir(path: str | os.PathLike[str], *, model_type: str, model_config: ModelConfig,
                    noise_config: NoiseConfig | None, state_dict: dict[str, torch.Tensor],
                    tokenizer: Tokenizer | None = None, extra: dict[str, Any] | None = None,
                    card: ModelCardInfo | None = None) -> Path:
    """Write a model directory atomically (temp dir, then swapped in over any previous one): config, weights,
    the tokenizer files (if any) with the model's special token ids, and the model card (``card`` adds what the
    model does not know: data, training figures, repo id). A tokenizer whose vocabulary is not the model's is a
    ``ValueError`` naming ``model.vocab_size``."""
    if tokenizer is not None and tokenizer.get_vocab_size(with_added_tokens=True) != model_config.vocab_size:
        raise ValueError(f"model.vocab_size={model_config.vocab_size} but the tokenizer has "
                         f"{tokenizer.get_vocab_size(with_added_tokens=True)} tokens: save a model with the "
                         "tokenizer it was trained with")
    config = {
        "model_type": model_type,
        "format_version": FORMAT_VERSION,
        "model": asdict(model_config),
        "noise": asdict(noise_config) if noise_config is not None else None,
        **(extra or {}),
    }
    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "model_type": model_type})
        roles = None
        if tokenizer is not None:
            roles = save_tokenizer(tokenizer, tmp, model_role_ids(model_config),
                                   model_max_length=model_config.max_seq_len)
        (tmp / CARD_NAME).write_text(render_model_card(
            model_type=model_type, model_config=model_config, noise_config=noise_config,
            num_parameters=sum(t.numel() for t in tensors.values()), special_tokens=roles, info=card))
    return Path(path).absolute()


def resolve_model_dir(uri: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local directory for ``uri``: a local path as is; an MLflow URI (``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/ID/model``) downloaded by MLflow (tracking URI from
    ``MLFLOW_TRACKING_URI``); any other fsspec URL (``s3://``, ``gs://``, ``file://``...) copied to a temp dir;
    ``owner/name`` that is not a local directory: that Hugging Face Hub repo (at ``revision``) through the Hub cache
    (:func:`mdlm.hf_hub.download_repo`). An MLflow pyfunc model of this project resolves to the model directory
    it holds."""
    text = str(uri)
    if is_mlflow_uri(text):
        import mlflow

        return _inside_mlflow_model(Path(mlflow.artifacts.download_artifacts(text)))
    if is_url(text):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(text)
        if not fs.isdir(remote):
            raise FileNotFoundError(f"model directory not found: {text}")
        local = Path(tempfile.mkdtemp(prefix="mdlm-model-"))
        if fs.exists(f"{remote.rstrip('/')}/MLmodel"):  # an MLflow pyfunc model: its files, then the inner folder
            fs.get(remote.rstrip("/") + "/", str(local), recursive=True)
            return _inside_mlflow_model(local)
        for name in MODEL_FILES:
            source = f"{remote.rstrip('/')}/{name}"
            if fs.exists(source):
                fs.get(source, str(local / name))
        return local
    if is_repo_id(text) and not Path(text).exists():
        return download_repo(text, MODEL_FILES, revision=revision)
    return _inside_mlflow_model(Path(text))


def _inside_mlflow_model(root: Path) -> Path:
    """The model directory itself when ``root`` is an MLflow pyfunc model of one (:mod:`mdlm.mlflow_model`): its
    ``MLmodel`` names it as the pyfunc artifact ``model``."""
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        return root
    import yaml

    try:
        flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
        inner = root / flavor["artifacts"][MLFLOW_MODEL_ARTIFACT]["path"]
    except (KeyError, TypeError, yaml.YAMLError):
        return root
    return inner if (inner / CONFIG_NAME).is_file() else root


def read_model_config(path: str | os.PathLike[str]) -> ModelDirConfig:
    """Read and validate the ``config.json`` of a local model directory, without loading the weights.

    Raises ``FileNotFoundError`` (no directory, no ``config.json``) or :class:`~mdlm.config.ConfigError` naming
    the file (invalid JSON, unknown model type, bad model or noise section)."""
    root = Path(path)
    config_path = root / CONFIG_NAME
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a model saved with save_pretrained")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path}: invalid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in MODEL_KINDS:
        raise ConfigError(f"{config_path}: model_type must be one of {', '.join(MODEL_KINDS)}, got {model_type!r}")
    try:
        model_config = dataclass_from_dict(ModelConfig, raw.get("model") or {}, "model")
        model_config.validate()
        noise_config = None
        if raw.get("noise") is not None:
            noise_config = dataclass_from_dict(NoiseConfig, raw["noise"], "noise")
            noise_config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    return ModelDirConfig(model_type=model_type, model_config=model_config, noise_config=noise_config, raw=raw)


def read_model_dir(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                   revision: str | None = None) -> dict[str, Any]:
    """Read and validate a model directory (local path, URI or Hub repo id, see ``resolve_model_dir``): config
    sections (:func:`read_model_config`), weights (safetensors) and tokenizer."""
    root = resolve_model_dir(path, revision=revision)
    config = read_model_config(root)
    weights_path = root / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    state_dict = load_file(str(weights_path), device=str(map_location))
    tokenizer_path = root / TOKENIZER_NAME
    tokenizer = Tokenizer.from_file(str(tokenizer_path)) if tokenizer_path.is_file() else None
    return {"model_type": config.model_type, "model_config": config.model_config,
            "noise_config": config.noise_config, "state_dict": state_dict, "tokenizer": tokenizer}

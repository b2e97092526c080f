"""The model and the corpora of an evaluation, resolved and checked before any Ray work.

Errors are :class:`~mdlm.eval.EvalInputError` naming the field (``model``, ``data``, ``nelbo.split``) and the
path or URI at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdlm.config import DIFFUSION_KINDS, ConfigError, ModelConfig
from mdlm.eval import EvalInputError
from mdlm.eval.settings import parse_data_spec
from mdlm.hub import TOKENIZER_NAME, WEIGHTS_NAME, read_model_config, resolve_model_dir
from mdlm.storage import absolute


@dataclass
class ModelInfo:
    """A resolved model directory and what the checks need from it (weights are not loaded)."""

    uri: str
    local_dir: Path
    model_type: str  # a model.kind: 'mdlm', 'sedd', 'd3pm' or 'ar'
    config: ModelConfig
    noise: dict[str, Any] | None  # the noise section of config.json, as written
    tokenizer_file: Path | None

    @property
    def is_diffusion(self) -> bool:
        return self.model_type in DIFFUSION_KINDS


def inspect_model(uri: str) -> ModelInfo:
    """Resolve ``uri`` (path, fsspec URL, ``models:/``, ``runs:/``; MLflow URIs use the current tracking URI)
    and validate its ``config.json`` (:func:`mdlm.hub.read_model_config`) and weights file;
    :class:`EvalInputError` naming ``model`` otherwise."""
    try:
        root = resolve_model_dir(uri)
    except Exception as exc:  # MLflow: unknown model or run; fsspec: missing directory
        raise EvalInputError("model", f"cannot be resolved ({str(exc).splitlines()[0]})", value=str(uri)) from None
    try:
        config = read_model_config(root)
    except (FileNotFoundError, ConfigError) as exc:
        raise EvalInputError("model", str(exc), value=str(uri)) from None
    if not (root / WEIGHTS_NAME).is_file():
        raise EvalInputError("model", f"{root / WEIGHTS_NAME} is missing", value=str(uri))
    tokenizer = root / TOKENIZER_NAME
    return ModelInfo(uri=str(uri), local_dir=root, model_type=config.model_type, config=config.model_config,
                     noise=config.raw.get("noise"), tokenizer_file=tokenizer if tokenizer.is_file() else None)


@dataclass
class Corpus:
    """A prepared data directory and the split to evaluate."""

    name: str
    path: str  # a local directory or a URL
    manifest: Any  # Manifest
    split: str
    rows: int  # rows to evaluate (max_rows applied)


def open_corpus(spec: str, split: str, max_rows: int | None = None) -> Corpus:
    """Load a prepared directory's manifest and check that ``split`` exists and has rows."""
    from mdlm.data.manifest import ManifestError, load_manifest

    name, path = parse_data_spec(spec)
    try:
        manifest = load_manifest(path)
    except (FileNotFoundError, ManifestError) as exc:
        raise EvalInputError("data", str(exc), value=path) from None
    if split not in manifest.splits:
        raise EvalInputError("nelbo.split", f"no split {split!r} in {path} (splits: {', '.join(manifest.splits)})")
    rows = manifest.rows(split)
    if rows < 1:
        raise EvalInputError("nelbo.split", f"the {split!r} split of {path} is empty")
    return Corpus(name=name, path=absolute(path), manifest=manifest, split=split,
                  rows=min(rows, max_rows) if max_rows else rows)


def _tokenizer_json(path: str | Path) -> dict[str, Any]:
    """A tokenizer file (local or a URL) as the tokenizers library serialises it (so formatting differences do
    not count)."""
    from tokenizers import Tokenizer

    from mdlm.storage import read_bytes

    return json.loads(Tokenizer.from_str(read_bytes(path).decode()).to_str())


def check_compatible(model: ModelInfo, corpus: Corpus) -> None:
    """The data must be tokenized as the model was trained: vocabulary size, [MASK] id, tokenizer.json content
    (when both have one), and rows no longer than the model's context."""
    manifest, config = corpus.manifest, model.config
    data = str(corpus.path)
    where = f"its tokenizer ({manifest.tokenizer_path})"
    against = f"the model's ({model.uri})"
    if manifest.vocab_size != config.vocab_size:
        raise EvalInputError("data", f"{where} has {manifest.vocab_size} tokens, {against} has {config.vocab_size}",
                             value=data)
    if config.mask_token_id is not None and manifest.mask_token_id != config.mask_token_id:
        raise EvalInputError("data", f"{where} has [MASK] = {manifest.mask_token_id}, {against} has "
                             f"{config.mask_token_id}", value=data)
    if model.tokenizer_file is not None and _tokenizer_json(model.tokenizer_file) != _tokenizer_json(
            manifest.tokenizer_path):
        raise EvalInputError("data", f"{where} differs from {against} tokenizer.json ({model.tokenizer_file})",
                             value=data)
    if manifest.block_size > config.max_seq_len:
        raise EvalInputError("data", f"rows of {manifest.block_size} tokens exceed the model's max_seq_len "
                             f"{config.max_seq_len}", value=data)

"""What a model needs to know about its data, declared once.

``DataSpec`` is built by whatever produced the data: the manifest of a prepared dataset
(:meth:`mdlm.data.manifest.Manifest.data_spec`) or the in-memory data of the single-process path
(:func:`mdlm.data.local.prepare_in_memory`). :func:`resolve_model_config` is the one place where it meets the
architecture: vocabulary size, special token ids and the block size come from the data, never from presets.
Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mdlm.config import ModelConfig


@dataclass(frozen=True)
class DataSpec:
    """Vocabulary, special ids, row length and tokenizer of a prepared corpus."""

    vocab_size: int  # includes [MASK]
    mask_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    block_size: int  # tokens per row: the model's max_seq_len
    packing: str = "wrap"
    tokenizer_file: str | None = None  # a tokenizer.json the model is exported with (None: in memory only)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def resolve_model_config(model: ModelConfig, spec: DataSpec) -> ModelConfig:
    """The model config to build: the architecture from ``model``, everything the data decides from ``spec``
    (vocabulary size, [MASK]/BOS/EOS/PAD ids, ``max_seq_len`` = the block size). The AR baseline keeps the
    mask id only if the data has one (it never predicts it)."""
    return dataclasses.replace(
        model, vocab_size=spec.vocab_size, mask_token_id=spec.mask_token_id, bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id, max_seq_len=spec.block_size)

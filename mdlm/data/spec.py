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

from mdlm.config import ModelConfig
from mdlm.data.tokenizer import SpecialTokens


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

    @classmethod
    def from_special(cls, special: SpecialTokens, block_size: int, packing: str = "wrap",
                     tokenizer_file: str | None = None) -> DataSpec:
        """The spec of rows of ``block_size`` tokens from a tokenizer with these special tokens."""
        return cls(vocab_size=special.vocab_size, mask_token_id=special.mask_id, bos_token_id=special.bos_id,
                   eos_token_id=special.eos_id, pad_token_id=special.pad_id, block_size=block_size, packing=packing,
                   tokenizer_file=tokenizer_file)


def resolve_model_config(model: ModelConfig, spec: DataSpec) -> ModelConfig:
    """The model config to build: the architecture from ``model``, everything the data decides from ``spec``
    (vocabulary size, [MASK]/BOS/EOS/PAD ids, ``max_seq_len`` = the block size). The AR baseline keeps the
    mask id only if the data has one (it never predicts it)."""
    return dataclasses.replace(
        model, vocab_size=spec.vocab_size, mask_token_id=spec.mask_token_id, bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id, max_seq_len=spec.block_size)

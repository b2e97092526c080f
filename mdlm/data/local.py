"""In-process corpus preparation (read -> split by document -> tokenize -> pack) for small corpora: the
quickstart and tests. The Ray Data pipeline (:mod:`mdlm.data.pipeline`) does the same at scale, from the same
sources, parsing and document keys (:mod:`mdlm.data.sources`), so a corpus splits the same way in both."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from mdlm.config import DataConfig
from mdlm.data.packing import PackedRows, WrapPacker, pack_pad
from mdlm.data.sources import resolve_source
from mdlm.data.spec import DataSpec
from mdlm.data.splits import SPLITS, check_train_split, split_of
from mdlm.data.tokenizer import SpecialTokens, load_tokenizer_for, special_tokens_for, train_bpe


@dataclass
class InMemoryData:
    tokenizer: Tokenizer
    special: SpecialTokens
    input_ids: dict[str, torch.Tensor]  # split -> [N, block_size]
    attention_mask: dict[str, torch.Tensor]
    spec: DataSpec  # what a model needs from this data (tokenizer_file=None: the tokenizer is in memory only)


def load_documents(config: DataConfig) -> list[tuple[str, str]]:
    """Every document of ``data.source`` as ``(key, text)`` in corpus order, keyed ``relative/path:index``
    (:func:`~mdlm.data.sources.resolve_source`, then each file parsed by its format)."""
    return list(resolve_source(config).documents(config))


def split_documents(config: DataConfig) -> dict[str, list[str]]:
    """The texts of each split, in corpus order, assigned by key as the Ray pipeline assigns them."""
    by_split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for key, text in load_documents(config):
        by_split[split_of(key, config)].append(text)
    return by_split


def prepare_in_memory(config: DataConfig) -> InMemoryData:
    """Read, split, tokenize and pack ``config``'s corpus in this process: the same documents, split keys and
    rows as :func:`mdlm.data.pipeline.prepare_dataset` gives for the same config."""
    config.validate("data")
    by_split = split_documents(config)
    if config.tokenizer == "bpe":
        tokenizer = train_bpe(by_split["train"], config.tokenizer_vocab_size)
        special = special_tokens_for(tokenizer, config.tokenizer)
    else:
        tokenizer, special = load_tokenizer_for(config)
    ids: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, texts in by_split.items():
        encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        if config.packing == "wrap":
            rows = WrapPacker(config.block_size, special.bos_id, special.eos_id).add(encoded)
        else:
            rows = pack_pad(encoded, config.block_size, special.bos_id, special.eos_id, special.pad_id)
        ids[name], masks[name] = _as_tensors(rows, config.block_size)
    check_train_split(config, len(by_split["train"]), len(ids["train"]))
    spec = DataSpec.from_special(special, config.block_size, packing=config.packing)
    return InMemoryData(tokenizer, special, ids, masks, spec)


def _as_tensors(rows: PackedRows, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not len(rows):
        return torch.empty(0, block_size, dtype=torch.long), torch.empty(0, block_size, dtype=torch.long)
    return torch.tensor(rows.input_ids, dtype=torch.long), torch.tensor(rows.attention_mask, dtype=torch.long)

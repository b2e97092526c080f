"""In-process corpus preparation (read -> split by document -> tokenize -> pack) for small corpora: the
quickstart and tests. The Ray Data pipeline does the same at scale."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from mdlm.config import DataConfig
from mdlm.data.packing import PackedRows, WrapPacker, pack_pad
from mdlm.data.sources import DEFAULT_CORPUS, read_documents, shakespeare_documents
from mdlm.data.splits import assign_split
from mdlm.data.tokenizer import SpecialTokens, special_tokens, tokenizer_from_spec, train_bpe

SPLITS = ("train", "validation", "test")


@dataclass
class InMemoryData:
    tokenizer: Tokenizer
    special: SpecialTokens
    input_ids: dict[str, torch.Tensor]  # split -> [N, block_size]
    attention_mask: dict[str, torch.Tensor]


def load_documents(config: DataConfig) -> list[tuple[str, str]]:
    if config.source == DEFAULT_CORPUS:
        return shakespeare_documents()
    pattern = os.path.expanduser(config.source)
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) \
        else [Path(pattern)]
    files = [p for p in paths if p.is_file()] + [f for p in paths if p.is_dir() for f in sorted(p.rglob("*.txt"))]
    if not files:
        raise FileNotFoundError(f"data.source: no text files found at {config.source!r}")
    return [(str(p), text) for p, text in zip(files, read_documents(files, config.encoding), strict=True)]


def prepare_in_memory(config: DataConfig, seed: int = 0) -> InMemoryData:
    docs = load_documents(config)
    by_split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for key, text in docs:
        by_split[assign_split(key, config.validation_fraction, config.test_fraction, seed)].append(text)
    if not by_split["train"]:
        raise ValueError(f"data.source: no training documents in {config.source!r}")
    if config.tokenizer == "bpe":
        tokenizer = train_bpe(by_split["train"], config.tokenizer_vocab_size)
    else:
        tokenizer = tokenizer_from_spec(config.tokenizer)
    special = special_tokens(tokenizer)
    ids: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, texts in by_split.items():
        encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        if config.packing == "wrap":
            rows = WrapPacker(config.block_size, special.bos_id, special.eos_id).add(encoded)
        else:
            rows = pack_pad(encoded, config.block_size, special.bos_id, special.eos_id, special.pad_id)
        ids[name], masks[name] = _as_tensors(rows, config.block_size)
    return InMemoryData(tokenizer, special, ids, masks)


def _as_tensors(rows: PackedRows, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not len(rows):
        return torch.empty(0, block_size, dtype=torch.long), torch.empty(0, block_size, dtype=torch.long)
    return torch.tensor(rows.input_ids, dtype=torch.long), torch.tensor(rows.attention_mask, dtype=torch.long)

"""Packing token lists into fixed-length training rows (pure functions; Ray Data only maps them).

``wrap`` (MDLM's OpenWebText setup): every document gets [EOS] appended, documents are concatenated and
cut into chunks of block_size - 2 tokens, and each row is [BOS] + chunk + [EOS]. ``WrapPacker`` keeps
the remainder between calls so that no tokens are dropped at batch boundaries; only the final
remainder of a stream (shorter than one chunk) is dropped.

``pad`` (MDLM's LM1B setup): each document becomes one row, [BOS] + tokens + [EOS], truncated or padded
to block_size, with an attention mask that is 0 on padding.

``ArrayWrapPacker`` and ``pack_pad_arrays`` produce exactly the same rows from numpy arrays (documents as one
flat token array plus their lengths), vectorised for the Ray Data pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackedRows:
    input_ids: list[list[int]] = field(default_factory=list)
    attention_mask: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def _check_block(block_size: int) -> None:
    if block_size < 3:
        raise ValueError(f"block_size must be >= 3 ([BOS] + at least one token + [EOS]), got {block_size}")


@dataclass
class WrapPacker:
    """Streaming ``wrap`` packer: feed documents batch by batch, get full rows, carry the remainder."""

    block_size: int
    bos_id: int
    eos_id: int
    buffer: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_block(self.block_size)

    @property
    def chunk(self) -> int:
        return self.block_size - 2

    def add(self, documents: Iterable[Sequence[int]]) -> PackedRows:
        for doc in documents:
            self.buffer.extend(doc)
            self.buffer.append(self.eos_id)
        n_rows = len(self.buffer) // self.chunk
        rows = PackedRows()
        for i in range(n_rows):
            piece = self.buffer[i * self.chunk:(i + 1) * self.chunk]
            rows.input_ids.append([self.bos_id, *piece, self.eos_id])
            rows.attention_mask.append([1] * self.block_size)
        del self.buffer[:n_rows * self.chunk]
        return rows


def pack_wrap(documents: Iterable[Sequence[int]], block_size: int, bos_id: int, eos_id: int) -> PackedRows:
    """All full ``wrap`` rows of ``documents``; the final remainder (< block_size - 2 tokens) is dropped."""
    return WrapPacker(block_size, bos_id, eos_id).add(documents)


def pack_pad(documents: Iterable[Sequence[int]], block_size: int, bos_id: int, eos_id: int,
             pad_id: int) -> PackedRows:
    """One row per document: [BOS] + tokens + [EOS], truncated to block_size or padded with ``pad_id``."""
    _check_block(block_size)
    rows = PackedRows()
    for doc in documents:
        ids = [bos_id, *doc[:block_size - 2], eos_id]
        pad = block_size - len(ids)
        rows.input_ids.append(ids + [pad_id] * pad)
        rows.attention_mask.append([1] * len(ids) + [0] * pad)
    return rows


def with_eos(values: np.ndarray, lengths: np.ndarray, eos_id: int) -> np.ndarray:
    """The token stream of documents (``values`` concatenated, ``lengths`` each) with [EOS] after each one."""
    lengths = np.asarray(lengths, dtype=np.int64)
    eos_at = np.cumsum(lengths + 1) - 1
    out = np.empty(len(values) + len(lengths), dtype=np.int32)
    is_token = np.ones(len(out), dtype=bool)
    is_token[eos_at] = False
    out[is_token] = values
    out[eos_at] = eos_id
    return out


class ArrayWrapPacker:
    """:class:`WrapPacker` on numpy arrays: same rows, same carried remainder, vectorised."""

    def __init__(self, block_size: int, bos_id: int, eos_id: int) -> None:
        _check_block(block_size)
        self.block_size, self.bos_id, self.eos_id = block_size, bos_id, eos_id
        self.buffer = np.empty(0, dtype=np.int32)

    def add(self, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Full rows ``[n, block_size]`` (int32) from these documents plus the carried remainder."""
        chunk = self.block_size - 2
        stream = np.concatenate([self.buffer, with_eos(values, lengths, self.eos_id)])
        n = len(stream) // chunk
        rows = np.empty((n, self.block_size), dtype=np.int32)
        rows[:, 0] = self.bos_id
        rows[:, -1] = self.eos_id
        rows[:, 1:-1] = stream[:n * chunk].reshape(n, chunk)
        self.buffer = stream[n * chunk:].copy()
        return rows


def pack_pad_arrays(values: np.ndarray, lengths: np.ndarray, block_size: int, bos_id: int, eos_id: int,
                    pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pack_pad` on numpy arrays: ``input_ids`` (int32) and ``attention_mask`` (int8), ``[n, block_size]``."""
    _check_block(block_size)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    starts = np.cumsum(lengths) - lengths
    keep = np.minimum(lengths, block_size - 2)
    ids = np.full((n, block_size), pad_id, dtype=np.int32)
    ids[:, 0] = bos_id
    columns = np.arange(block_size - 2)
    take = columns[None, :] < keep[:, None]
    middle = ids[:, 1:-1]
    middle[take] = np.asarray(values)[(starts[:, None] + columns[None, :])[take]]
    ids[np.arange(n), keep + 1] = eos_id
    mask = (np.arange(block_size)[None, :] <= (keep + 1)[:, None]).astype(np.int8)
    return ids, mask

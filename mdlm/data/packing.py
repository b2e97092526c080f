"""Packing token lists into fixed-length training rows (pure functions; Ray Data only maps them).

``wrap`` (MDLM's OpenWebText setup): every document gets [EOS] appended, documents are concatenated and
cut into chunks of block_size - 2 tokens, and each row is [BOS] + chunk + [EOS]. ``WrapPacker`` keeps
the remainder between calls so that no tokens are dropped at batch boundaries; only the final
remainder of a stream (shorter than one chunk) is dropped.

``pad`` (MDLM's LM1B setup): each document becomes one row, [BOS] + tokens + [EOS], truncated or padded
to block_size, with an attention mask that is 0 on padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


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

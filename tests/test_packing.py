"""Packing token lists into rows: ``wrap`` (streaming, carry across batches) and ``pad``.

Property tests over seeded random inputs (hypothesis is not a dependency of this project).
"""

from __future__ import annotations

import random

import pytest

from mdlm.data.packing import PackedRows, WrapPacker, pack_pad, pack_wrap

BOS, EOS, PAD = 0, 1, 2
SEEDS = range(100)


def _random_docs(rng: random.Random, max_docs: int = 12, max_len: int = 20) -> list[list[int]]:
    # Document tokens are >= 3 so they never collide with the special ids.
    return [[rng.randrange(3, 100) for _ in range(rng.randrange(0, max_len + 1))]
            for _ in range(rng.randrange(0, max_docs + 1))]


def _stream(docs: list[list[int]], eos: int = EOS) -> list[int]:
    return [token for doc in docs for token in [*doc, eos]]


def _check_wrap(rows: PackedRows, docs: list[list[int]], block_size: int, bos: int = BOS,
                eos: int = EOS) -> None:
    chunk = block_size - 2
    stream = _stream(docs, eos)
    assert len(rows) == len(stream) // chunk
    assert len(rows.attention_mask) == len(rows.input_ids)
    for row, mask in zip(rows.input_ids, rows.attention_mask, strict=True):
        assert len(row) == block_size
        assert row[0] == bos and row[-1] == eos
        assert mask == [1] * block_size
    middles = [token for row in rows.input_ids for token in row[1:-1]]
    assert middles == stream[:len(middles)]
    assert 0 <= len(stream) - len(middles) < chunk  # only the final remainder is dropped


@pytest.mark.parametrize("seed", SEEDS)
def test_wrap_properties(seed):
    rng = random.Random(seed)
    docs = _random_docs(rng)
    block_size = rng.randrange(3, 16)
    rows = pack_wrap(docs, block_size, BOS, EOS)
    _check_wrap(rows, docs, block_size)


def test_wrap_with_bos_equal_to_eos():
    docs = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13]]
    rows = pack_wrap(docs, 5, 0, 0)  # GPT-2 style: <|endoftext|> is both
    _check_wrap(rows, docs, 5, bos=0, eos=0)
    # stream: 5 6 7 0 8 0 0 9 10 11 12 13 0 -> chunks of 3, remainder [0] dropped
    assert rows.input_ids == [[0, 5, 6, 7, 0], [0, 0, 8, 0, 0], [0, 0, 9, 10, 0], [0, 11, 12, 13, 0]]


def test_wrap_known_example():
    rows = pack_wrap([[10, 11, 12], [13, 14]], 4, BOS, EOS)
    # stream: 10 11 12 EOS 13 14 EOS -> chunks of 2: (10 11) (12 EOS) (13 14), remainder (EOS) dropped
    assert rows.input_ids == [[BOS, 10, 11, EOS], [BOS, 12, EOS, EOS], [BOS, 13, 14, EOS]]
    assert rows.attention_mask == [[1, 1, 1, 1]] * 3


def test_wrap_short_input_gives_no_rows():
    assert len(pack_wrap([[5]], 10, BOS, EOS)) == 0
    assert len(pack_wrap([], 10, BOS, EOS)) == 0


def test_wrap_does_not_mutate_documents():
    docs = [[5, 6, 7], [8, 9]]
    pack_wrap(docs, 4, BOS, EOS)
    assert docs == [[5, 6, 7], [8, 9]]


@pytest.mark.parametrize("seed", SEEDS)
def test_wrap_packer_batches_equal_one_call(seed):
    rng = random.Random(1000 + seed)
    docs = _random_docs(rng, max_docs=30)
    block_size = rng.randrange(3, 20)
    whole = pack_wrap(docs, block_size, BOS, EOS)

    packer = WrapPacker(block_size, BOS, EOS)
    rows, masks = [], []
    start = 0
    while start < len(docs):
        stop = start + rng.randrange(0, 6)  # empty batches included
        out = packer.add(docs[start:stop])
        rows += out.input_ids
        masks += out.attention_mask
        start = stop
    packer.add([])
    assert rows == whole.input_ids
    assert masks == whole.attention_mask
    # What is left over is exactly the undropped tail of the stream, shorter than one chunk.
    stream = _stream(docs)
    assert packer.buffer == stream[len(rows) * (block_size - 2):]
    assert len(packer.buffer) < block_size - 2


def test_wrap_packer_carries_tokens_across_batches():
    packer = WrapPacker(6, BOS, EOS)  # chunks of 4
    assert len(packer.add([[10, 11]])) == 0  # 10 11 EOS: not a full chunk yet
    out = packer.add([[12, 13, 14]])  # 10 11 EOS 12 | 13 14 EOS
    assert out.input_ids == [[BOS, 10, 11, EOS, 12, EOS]]
    assert packer.buffer == [13, 14, EOS]
    out = packer.add([[15]])
    assert out.input_ids == [[BOS, 13, 14, EOS, 15, EOS]]
    assert packer.buffer == [EOS]


@pytest.mark.parametrize("seed", SEEDS)
def test_pad_properties(seed):
    rng = random.Random(2000 + seed)
    docs = _random_docs(rng)
    block_size = rng.randrange(3, 16)
    rows = pack_pad(docs, block_size, BOS, EOS, PAD)
    assert len(rows) == len(docs)
    for doc, row, mask in zip(docs, rows.input_ids, rows.attention_mask, strict=True):
        assert len(row) == len(mask) == block_size
        kept = doc[:block_size - 2]
        n_real = len(kept) + 2
        assert row[:n_real] == [BOS, *kept, EOS]
        assert row[n_real:] == [PAD] * (block_size - n_real)
        assert mask == [1] * n_real + [0] * (block_size - n_real)


def test_pad_known_examples():
    rows = pack_pad([[5, 6], [5, 6, 7, 8, 9, 10], [], [5, 6, 7]], 5, BOS, EOS, PAD)
    assert rows.input_ids == [
        [BOS, 5, 6, EOS, PAD],
        [BOS, 5, 6, 7, EOS],  # truncated to block_size
        [BOS, EOS, PAD, PAD, PAD],
        [BOS, 5, 6, 7, EOS],  # exactly block_size - 2 tokens: no padding
    ]
    assert rows.attention_mask == [[1, 1, 1, 1, 0], [1] * 5, [1, 1, 0, 0, 0], [1] * 5]


def test_pad_with_pad_equal_to_eos_still_masks_padding():
    rows = pack_pad([[5]], 6, BOS, EOS, EOS)
    assert rows.input_ids == [[BOS, 5, EOS, EOS, EOS, EOS]]
    assert rows.attention_mask == [[1, 1, 1, 0, 0, 0]]


@pytest.mark.parametrize("block_size", [-1, 0, 1, 2])
def test_block_size_below_three_raises(block_size):
    with pytest.raises(ValueError, match="block_size"):
        pack_wrap([[5, 6]], block_size, BOS, EOS)
    with pytest.raises(ValueError, match="block_size"):
        WrapPacker(block_size, BOS, EOS)
    with pytest.raises(ValueError, match="block_size"):
        pack_pad([[5, 6]], block_size, BOS, EOS, PAD)


def test_block_size_three_is_the_minimum():
    assert pack_wrap([[5, 6]], 3, BOS, EOS).input_ids == [[BOS, 5, EOS], [BOS, 6, EOS], [BOS, EOS, EOS]]
    assert pack_pad([[5, 6]], 3, BOS, EOS, PAD).input_ids == [[BOS, 5, EOS]]

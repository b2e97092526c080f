"""Document splits, reading text files, cutting long texts, and in-process corpus preparation."""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
import torch

from mdlm.config import DataConfig
from mdlm.data.local import load_documents, prepare_in_memory
from mdlm.data.sources import read_documents, shakespeare_documents, shakespeare_files, split_text
from mdlm.data.splits import assign_split

# ---------------------------------------------------------------------------------------------------------
# assign_split


def test_assign_split_is_deterministic():
    keys = [f"doc-{i}" for i in range(500)]
    first = [assign_split(key, 0.1, 0.1) for key in keys]
    assert first == [assign_split(key, 0.1, 0.1) for key in keys]
    assert first == [assign_split(key, 0.1, 0.1) for key in reversed(keys)][::-1]  # order-independent
    assert set(first) == {"train", "validation", "test"}


def test_assign_split_seed_changes_assignment():
    keys = [f"doc-{i}" for i in range(500)]
    a = [assign_split(key, 0.2, 0.2, seed=0) for key in keys]
    b = [assign_split(key, 0.2, 0.2, seed=1) for key in keys]
    assert a != b


@pytest.mark.parametrize(("validation", "test"), [(0.05, 0.05), (0.1, 0.2), (0.0, 0.3)])
def test_assign_split_follows_fractions(validation, test):
    n = 10_000
    counts = Counter(assign_split(f"key-{i}", validation, test) for i in range(n))
    assert abs(counts["validation"] / n - validation) < 0.01
    assert abs(counts["test"] / n - test) < 0.01
    assert abs(counts["train"] / n - (1 - validation - test)) < 0.01
    assert sum(counts.values()) == n


def test_assign_split_zero_fractions_is_all_train():
    assert {assign_split(f"k{i}", 0.0, 0.0) for i in range(1000)} == {"train"}


def test_assign_split_nested():
    """Raising the validation fraction keeps every document that was already in validation there."""
    for i in range(2000):
        key = f"k{i}"
        if assign_split(key, 0.05, 0.0) == "validation":
            assert assign_split(key, 0.1, 0.0) == "validation"


# ---------------------------------------------------------------------------------------------------------
# read_documents


def test_read_documents_utf8(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\nworld", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"second")
    assert read_documents([tmp_path / "a.txt", tmp_path / "b.txt"]) == ["héllo\nworld", "second"]


def test_read_documents_bad_bytes_name_file_and_offset(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine")
    bad = tmp_path / "quotes.txt"
    bad.write_bytes(b"He said \x93hello\x94 twice.")
    with pytest.raises(ValueError) as info:
        read_documents([good, bad])
    message = str(info.value)
    assert str(bad) in message
    assert "0x93" in message
    assert "offset 8" in message
    assert "data.encoding" in message
    assert str(good) not in message
    assert not isinstance(info.value, UnicodeDecodeError)


def test_read_documents_cp1252(tmp_path):
    bad = tmp_path / "quotes.txt"
    bad.write_bytes(b"He said \x93hello\x94 twice.")
    assert read_documents([bad], encoding="cp1252") == ["He said \u201chello\u201d twice."]


# ---------------------------------------------------------------------------------------------------------
# split_text


def _random_text(rng: random.Random, max_paragraph: int) -> str:
    paragraphs = []
    for _ in range(rng.randrange(1, 30)):
        words = [rng.choice(["to", "be", "or", "not", "question", "lend", "me", "ears"])
                 for _ in range(rng.randrange(1, 40))]
        paragraphs.append(" ".join(words)[:max_paragraph])
    return "\n\n".join(paragraphs)


@pytest.mark.parametrize("seed", range(40))
def test_split_text_respects_max_chars_and_keeps_text(seed):
    rng = random.Random(seed)
    max_chars = rng.randrange(20, 300)
    text = _random_text(rng, max_paragraph=max_chars)
    pieces = split_text(text, max_chars)
    assert pieces
    assert all(len(piece) <= max_chars for piece in pieces), max_chars
    assert "\n\n".join(pieces) == text  # cut only at blank lines, nothing lost


def test_split_text_known_example():
    text = "aaaa\n\nbbbb\n\ncccc"
    assert split_text(text, 10) == ["aaaa\n\nbbbb", "cccc"]
    assert split_text(text, 9) == ["aaaa", "bbbb", "cccc"]
    assert split_text(text, 100) == [text]


def test_split_text_oversized_paragraph_stays_whole():
    long = "x" * 50
    assert split_text(f"a\n\n{long}\n\nb", 10) == ["a", long, "b"]


def test_split_text_drops_blank_pieces():
    assert split_text("", 10) == []
    assert split_text("   ", 10) == []


def test_shakespeare_documents_are_cut_to_max_chars():
    docs = shakespeare_documents()
    assert len(docs) > len(shakespeare_files())  # the works are cut into parts
    assert len({key for key, _ in docs}) == len(docs)  # unique keys
    assert all(0 < len(text) <= 20_000 for _, text in docs)
    small = shakespeare_documents(max_chars=5_000)
    assert len(small) > len(docs)


# ---------------------------------------------------------------------------------------------------------
# load_documents / prepare_in_memory on a small local corpus


@pytest.fixture()
def corpus(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(60):
        folder = root / "sub" if i % 2 else root
        (folder / f"doc{i:02d}.txt").write_text(_random_text(rng, 200))
    (root / "ignored.md").write_text("not a .txt file")
    return root


def test_load_documents_from_directory(corpus):
    docs = load_documents(DataConfig(source=str(corpus)))
    assert len(docs) == 60
    assert all(key.endswith(".txt") for key, _ in docs)


def test_load_documents_relative_glob(corpus, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    docs = load_documents(DataConfig(source="corpus/*.txt"))
    assert len(docs) == 30


def test_load_documents_absolute_glob(corpus):
    docs = load_documents(DataConfig(source=os.path.join(str(corpus), "*.txt")))
    assert len(docs) == 30


def test_load_documents_missing_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.source"):
        load_documents(DataConfig(source=str(tmp_path / "nothing-here")))


def test_load_documents_encoding(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\x93quoted\x94")
    with pytest.raises(ValueError, match="0x93"):
        load_documents(DataConfig(source=str(tmp_path)))
    docs = load_documents(DataConfig(source=str(tmp_path), encoding="cp1252"))
    assert docs[0][1] == "\u201cquoted\u201d"


@pytest.mark.parametrize("packing", ["wrap", "pad"])
def test_prepare_in_memory(corpus, packing):
    config = DataConfig(source=str(corpus), tokenizer_vocab_size=300, block_size=16, packing=packing,
                        validation_fraction=0.2, test_fraction=0.2)
    data = prepare_in_memory(config)
    assert set(data.input_ids) == {"train", "validation", "test"}
    assert data.special.vocab_size == data.tokenizer.get_vocab_size(with_added_tokens=True)
    for split, ids in data.input_ids.items():
        mask = data.attention_mask[split]
        assert ids.dtype == torch.long and ids.shape == mask.shape
        assert ids.shape[0] > 0 and ids.shape[1] == 16, split
        assert (ids[:, 0] == data.special.bos_id).all()
        assert int(ids.max()) < data.special.vocab_size
        assert not (ids == data.special.mask_id).any()  # [MASK] never appears in the data
        if packing == "wrap":
            assert (ids[:, -1] == data.special.eos_id).all() and bool(mask.all())
        else:
            assert (ids[mask == 0] == data.special.pad_id).all()
            assert (mask.sum(dim=1) >= 2).all()

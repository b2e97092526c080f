"""Document splits, reading text files, cutting long texts, and in-process corpus preparation (the same
documents, split and rows as the Ray pipeline)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from mdlm.config import DataConfig
from mdlm.data.local import load_documents, prepare_in_memory, split_documents
from mdlm.data.sources import (
    DataError,
    read_documents,
    resolve_source,
    shakespeare_documents,
    shakespeare_files,
    split_text,
)
from mdlm.data.spec import DataSpec
from mdlm.data.splits import SPLITS, assign_split

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
    assert all(key.endswith(".txt:0") for key, _ in docs)  # relative/path:index, as the Ray pipeline keys them
    assert "sub/doc01.txt:0" in [key for key, _ in docs]


def test_load_documents_relative_glob(corpus, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    docs = load_documents(DataConfig(source="corpus/*.txt"))
    assert len(docs) == 30


def test_load_documents_absolute_glob(corpus):
    docs = load_documents(DataConfig(source=os.path.join(str(corpus), "*.txt")))
    assert len(docs) == 30


def test_load_documents_missing_source_raises(tmp_path):
    with pytest.raises(DataError, match=r"data\.source=.*no such file or directory"):
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
    assert data.spec == DataSpec.from_special(data.special, 16, packing=packing)
    assert data.spec.tokenizer_file is None and data.spec.vocab_size == data.special.vocab_size


def test_prepare_in_memory_without_training_documents(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n   \n\n")
    with pytest.raises(DataError, match="no training documents"):
        prepare_in_memory(DataConfig(source=str(tmp_path), tokenizer_vocab_size=300))


# ---------------------------------------------------------------------------------------------------------
# The in-process path and the Ray pipeline: same sources, same parsing, same split, same rows


@pytest.fixture()
def mixed_corpus(tmp_path):
    """Text files (top level and nested, some cut into several documents), jsonl and parquet with a custom
    text field, and files every source skips (hidden, unknown extension)."""
    rng = random.Random(1)
    root = tmp_path / "mixed"
    (root / "nested" / "deeper").mkdir(parents=True)
    for i in range(12):
        folder = [root, root / "nested", root / "nested" / "deeper"][i % 3]
        (folder / f"part{i:02d}.txt").write_text(_random_text(rng, 200))
    rows = [{"body": _random_text(rng, 80), "id": i} for i in range(40)]
    rows[3]["body"] = None
    rows[7]["body"] = ""
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 9 else "") for i, r in
                                             enumerate(rows)))
    pq.write_table(pa.table({"body": [_random_text(rng, 80) for _ in range(20)]}), root / "nested" / "t.parquet")
    (root / ".hidden.txt").write_text("never read")
    (root / "notes.md").write_text("not a corpus extension")
    return root


def test_load_documents_keys_and_formats_match_the_sources(mixed_corpus):
    config = DataConfig(source=str(mixed_corpus), text_field="body", max_document_chars=300)
    docs = load_documents(config)
    keys = [key for key, _ in docs]
    assert len(set(keys)) == len(keys)
    files = {key.rsplit(":", 1)[0] for key in keys}
    assert files == {f.key for f in resolve_source(config).files}
    assert {"rows.jsonl", "nested/t.parquet", "nested/deeper/part02.txt"} <= files
    assert not any(".hidden" in key or "notes.md" in key for key in keys)
    assert "rows.jsonl:3" not in keys and "rows.jsonl:7" not in keys and "rows.jsonl:11" in keys  # blank line 10
    assert sum(key.startswith("part00.txt:") for key in keys) > 1  # cut at blank lines into ~300 characters
    assert len(load_documents(DataConfig(source=str(mixed_corpus), text_field="body", max_files=3))) < len(docs)


CASES = {
    "files-gpt2-wrap": {"text_field": "body", "max_document_chars": 300, "tokenizer": "gpt2", "block_size": 32},
    "files-bpe-pad": {"text_field": "body", "max_document_chars": 300, "tokenizer": "bpe", "packing": "pad",
                      "block_size": 24, "seed": 3},
    "shakespeare-bpe-wrap": {"source": "shakespeare", "max_files": 3, "tokenizer": "bpe", "block_size": 32},
}


@pytest.mark.ray
@pytest.mark.parametrize("case", list(CASES))
def test_in_memory_and_ray_give_the_same_split_and_rows(ray_local, mixed_corpus, tmp_path, case):
    from mdlm.data.pipeline import documents_dataset, prepare_dataset

    values = {"source": str(mixed_corpus), "tokenizer_vocab_size": 300, "validation_fraction": 0.2,
              "test_fraction": 0.2, "batch_size": 16, "output_dir": str(tmp_path / "prepared"), **CASES[case]}
    config = DataConfig(**values)
    local = split_documents(config)
    data = prepare_in_memory(config)
    manifest = prepare_dataset(config, progress=False)
    ray_docs: dict[str, list[str]] = {split: [] for split in SPLITS}
    for row in documents_dataset(resolve_source(config), config).iter_rows():
        ray_docs[row["split"]].append(row["text"])
    saved = Tokenizer.from_file(manifest.tokenizer_path)
    assert saved.to_str() == data.tokenizer.to_str()  # bpe: trained on the same training documents
    assert dataclasses.replace(manifest.data_spec(), tokenizer_file=None) == data.spec
    for split in SPLITS:
        assert local[split], split
        assert sorted(ray_docs[split]) == sorted(local[split]), split
        assert manifest.splits[split].documents == len(local[split])
        files = manifest.split_files(split)
        table = pa.concat_tables([pq.read_table(f) for f in files]).to_pydict() if files else {"input_ids": []}
        assert data.input_ids[split].tolist() == table["input_ids"], split  # same rows, same order
        if config.packing == "pad":
            assert data.attention_mask[split].tolist() == table["attention_mask"], split

"""Byte-level BPE training, [MASK] handling, special-token resolution and loading."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from mdlm.data.sources import shakespeare_documents
from mdlm.data.tokenizer import (
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    ensure_mask_token,
    load_tokenizer,
    special_tokens,
    train_bpe,
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    docs = [text for _, text in shakespeare_documents()[:3]]
    assert sum(text.count("\n") for text in docs) > 300  # a few hundred lines of real text
    return docs


@pytest.fixture(scope="module")
def bpe(texts) -> Tokenizer:
    return train_bpe(texts, 512)


@pytest.mark.parametrize("vocab_size", [300, 512, 1024])
def test_train_bpe_vocab_size_is_exact_and_mask_is_last(texts, vocab_size):
    tokenizer = train_bpe(texts, vocab_size)
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size
    assert tokenizer.token_to_id(MASK_TOKEN) == vocab_size - 1
    assert max(tokenizer.get_vocab(with_added_tokens=True).values()) == vocab_size - 1
    special = special_tokens(tokenizer)
    assert special.vocab_size == vocab_size
    assert special.mask_id == vocab_size - 1


def test_special_tokens_of_bpe(bpe):
    special = special_tokens(bpe)
    eot = bpe.token_to_id(EOS_TOKEN)
    assert eot is not None
    assert special.bos_id == special.eos_id == eot
    assert special.pad_id == bpe.token_to_id(PAD_TOKEN)
    assert special.pad_id != special.eos_id
    assert len({special.mask_id, special.eos_id, special.pad_id}) == 3
    assert special_tokens(bpe) == special  # resolving again changes nothing
    assert bpe.get_vocab_size(with_added_tokens=True) == 512


def test_bpe_round_trips_text_exactly(bpe, texts):
    for text in texts:
        ids = bpe.encode(text, add_special_tokens=False).ids
        assert bpe.decode(ids) == text
        assert len(ids) < len(text)  # the merges compress
    for text in ["  leading spaces\n\n\ttabs and  double  spaces  \n", "naïve café — “quotes” 日本語 🙂",
                 "x", "", "\r\n\x00 control"]:
        assert bpe.decode(bpe.encode(text, add_special_tokens=False).ids) == text, repr(text)


def test_bpe_specials_are_single_tokens(bpe):
    ids = bpe.encode(f"hello{EOS_TOKEN}world", add_special_tokens=False).ids
    assert bpe.token_to_id(EOS_TOKEN) in ids
    assert bpe.encode(MASK_TOKEN, add_special_tokens=False).ids == [bpe.token_to_id(MASK_TOKEN)]


def test_train_bpe_rejects_tiny_vocab(texts):
    with pytest.raises(ValueError, match="260"):
        train_bpe(texts, 259)


def test_ensure_mask_token_is_idempotent(texts):
    tokenizer = train_bpe(texts, 300)
    assert ensure_mask_token(tokenizer) == 299
    assert ensure_mask_token(tokenizer) == 299
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 300


def _wordpiece(with_mask: bool = True, with_cls_sep: bool = True) -> Tokenizer:
    tokens = ["[PAD]", "[UNK]"] + (["[CLS]", "[SEP]"] if with_cls_sep else []) + ["hello", "world"]
    tokens += ["[MASK]"] if with_mask else []
    tokens += ["the", "##s", "cat"]
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_ensure_mask_token_reuses_existing_mask():
    tokenizer = _wordpiece()
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    assert tokenizer.token_to_id("[MASK]") == 6  # in the middle of the vocabulary
    assert ensure_mask_token(tokenizer) == 6
    assert tokenizer.get_vocab_size(with_added_tokens=True) == size  # nothing appended
    special = special_tokens(tokenizer)
    assert special.mask_id == 6
    assert special.bos_id == tokenizer.token_to_id("[CLS]") == 2
    assert special.eos_id == tokenizer.token_to_id("[SEP]") == 3
    assert special.pad_id == tokenizer.token_to_id("[PAD]") == 0
    assert special.vocab_size == size == 10


def test_ensure_mask_token_appends_when_missing():
    tokenizer = _wordpiece(with_mask=False)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    assert ensure_mask_token(tokenizer) == size
    assert tokenizer.get_vocab_size(with_added_tokens=True) == size + 1


def test_special_tokens_without_bos_eos_raises():
    with pytest.raises(ValueError, match="BOS/EOS"):
        special_tokens(_wordpiece(with_cls_sep=False))


def test_load_tokenizer_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json


def test_load_tokenizer_round_trip_and_disables_padding(tmp_path, bpe):
    saved = Tokenizer.from_str(bpe.to_str())
    saved.enable_padding(pad_id=1, pad_token=PAD_TOKEN, length=64)
    saved.enable_truncation(max_length=4)
    saved.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path, str(tmp_path)):
        loaded = load_tokenizer(path)
        assert loaded.padding is None and loaded.truncation is None
        text = "Is this a dagger which I see before me?"
        assert loaded.encode(text).ids == bpe.encode(text).ids
        assert special_tokens(loaded) == special_tokens(bpe)

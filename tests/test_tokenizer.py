"""Byte-level BPE training, [MASK] handling, special-token resolution and loading."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from mdlm.data.sources import shakespeare_documents
from mdlm.data.tokenizer import (
    EOS_TOKEN,
    HF_SPECIAL_TOKENS_FILE,
    MASK_TOKEN,
    PAD_TOKEN,
    TOKENIZER_FILES,
    ensure_mask_token,
    hf_special_tokens,
    load_tokenizer,
    save_tokenizer,
    special_tokens,
    tokenizer_from_spec,
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


HF_TEXTS = ["Is this a dagger which I see before me?", "  leading spaces\n\n\ttabs and  double  spaces  ",
            "naïve café — “quotes” 日本語 🙂", "x", "", "O Romeo, [MASK] art thou Romeo?"]


@pytest.mark.parametrize("spec", ["bpe", "gpt2", "bert-base-uncased"])
def test_saved_tokenizer_loads_in_transformers_with_the_same_ids_and_text(tmp_path, bpe, spec):
    from transformers import AutoTokenizer

    tokenizer = bpe if spec == "bpe" else tokenizer_from_spec(spec)
    special = special_tokens(tokenizer)
    roles = save_tokenizer(tokenizer, tmp_path, special.role_ids(), model_max_length=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TOKENIZER_FILES)
    assert json.loads((tmp_path / HF_SPECIAL_TOKENS_FILE).read_text()) == roles
    hf = AutoTokenizer.from_pretrained(str(tmp_path))  # a prepared dataset's folder: no config.json beside it
    assert hf.is_fast and hf.model_max_length == 128 and len(hf) == special.vocab_size
    assert (hf.mask_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        special.mask_id, special.bos_id, special.eos_id, special.pad_id)
    assert hf.mask_token == MASK_TOKEN
    for text in HF_TEXTS:
        for with_specials in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=with_specials).ids
            assert hf.encode(text, add_special_tokens=with_specials) == ids, (text, with_specials)
        ids = tokenizer.encode(text).ids
        assert hf.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False), repr(text)
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), repr(text)
    assert MASK_TOKEN in hf.convert_ids_to_tokens(hf.encode(HF_TEXTS[-1]))


def test_known_ids_per_tokenizer():
    # The closed forms: GPT-2's <|endoftext|> is 50256 and [MASK] is appended as 50257; bert-base-uncased
    # keeps its own [MASK] (103), [CLS] (101), [SEP] (102), [PAD] (0); its [UNK] (100) is declared too.
    gpt2 = special_tokens(tokenizer_from_spec("gpt2"))
    assert (gpt2.mask_id, gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (50257, 50256, 50256, 50256)
    bert_tokenizer = tokenizer_from_spec("bert-base-uncased")
    bert = special_tokens(bert_tokenizer)
    assert (bert.mask_id, bert.bos_id, bert.eos_id, bert.pad_id) == (103, 101, 102, 0)
    assert hf_special_tokens(bert_tokenizer, bert.role_ids()) == {
        "mask_token": "[MASK]", "bos_token": "[CLS]", "eos_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"}


def test_hf_special_tokens_reject_an_id_outside_the_vocabulary(bpe):
    assert hf_special_tokens(bpe, {"mask_token": 511, "bos_token": None}) == {"mask_token": MASK_TOKEN}
    with pytest.raises(ValueError, match=r"pad_token id 512 is not a token of the tokenizer \(512 tokens\)"):
        hf_special_tokens(bpe, {"pad_token": 512})
